//! Fills a test's etcd with `count` puts of `size` bytes over 64 keys of `network` (what a
//! compaction then has to discard), 32 at a time, each batch bounded in time. Shared by
//! `agent_etcd` and `multinode` (through `cluster`).

use std::time::Duration;

/// How long one batch of puts may take.
const BATCH_LIMIT: Duration = Duration::from_secs(60);

pub fn fill(url: &str, network: &str, count: usize, size: usize) {
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    runtime.block_on(async {
        let client = etcd_client::Client::connect([url], None).await.unwrap();
        let value = vec![b'x'; size];
        for chunk in (0..count).collect::<Vec<_>>().chunks(32) {
            let puts = chunk.iter().map(|i| {
                let mut client = client.clone();
                let key = format!("/wg-cni/v1/{network}/filler/{}", i % 64);
                let value = value.clone();
                async move { client.put(key, value, None).await }
            });
            let done = tokio::time::timeout(BATCH_LIMIT, futures::future::join_all(puts))
                .await
                .expect("etcd puts in time");
            for put in done {
                put.unwrap();
            }
        }
    });
}
