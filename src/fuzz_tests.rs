//! Property tests over everything the plugin parses from outside: stdin config (with
//! prevResult), the environment, IPAM results and store records. Whatever the input, parsing
//! never panics and failures carry one of the codes the spec allows for that input.
//! (cargo-fuzz needs nightly; proptest runs on stable, bounded, in `cargo test`.)

use proptest::prelude::*;
use serde_json::{Value, json};

use crate::cni::{CniEnv, CniResult, NetConf};
use crate::store::Record;

/// Arbitrary JSON, a few levels deep.
fn json_value() -> impl Strategy<Value = Value> {
    let leaf = prop_oneof![
        Just(Value::Null),
        any::<bool>().prop_map(Value::from),
        any::<i64>().prop_map(Value::from),
        any::<f64>().prop_map(|f| json!(f)),
        ".{0,12}".prop_map(Value::from),
        prop::sample::select(vec![
            "1.1.0",
            "0.4.0",
            "10.0.0.0/8",
            "fd00::/64",
            "127.0.0.1",
            "auto",
            "kernel",
            "1-2",
            "host-local",
            "0.0.0.0/0",
        ])
        .prop_map(Value::from),
    ];
    leaf.prop_recursive(3, 24, 6, |inner| {
        prop_oneof![
            prop::collection::vec(inner.clone(), 0..4).prop_map(Value::from),
            prop::collection::btree_map(".{0,8}", inner, 0..4)
                .prop_map(|m| Value::Object(m.into_iter().collect())),
        ]
    })
}

const CONFIG_FIELDS: [&str; 16] = [
    "cniVersion",
    "name",
    "type",
    "ipam",
    "backend",
    "store",
    "mtu",
    "endpoint",
    "listenPorts",
    "persistentKeepalive",
    "hostGateway",
    "ipMasq",
    "peers",
    "nodeName",
    "prevResult",
    "cni.dev/valid-attachments",
];

/// A config whose known fields hold arbitrary values.
fn config_like() -> impl Strategy<Value = Value> {
    prop::collection::vec(
        (prop::sample::select(CONFIG_FIELDS.to_vec()), json_value()),
        0..10,
    )
    .prop_map(|fields| {
        let mut conf = json!({
            "cniVersion": "1.0.0", "name": "n", "type": "wg-cni",
            "ipam": {"type": "host-local"},
        });
        for (k, v) in fields {
            conf[k] = v;
        }
        conf
    })
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 512, ..ProptestConfig::default() })]

    #[test]
    fn config_bytes_never_panic(bytes in prop::collection::vec(any::<u8>(), 0..512)) {
        if let Err(e) = NetConf::parse(&bytes) {
            prop_assert!([1, 6, 7].contains(&e.code()), "code {}", e.code());
        }
    }

    #[test]
    fn config_fields_never_panic(conf in config_like()) {
        if let Err(e) = NetConf::parse(conf.to_string().as_bytes()) {
            prop_assert!([1, 6, 7].contains(&e.code()), "code {} for {conf}", e.code());
        }
    }

    #[test]
    fn prev_results_never_panic(result in json_value()) {
        if let Err(e) = CniResult::parse(&result, "prevResult") {
            prop_assert_eq!(e.code(), 6);
        }
    }

    #[test]
    fn environments_never_panic(
        vars in prop::collection::btree_map(
            prop::sample::select(vec![
                "CNI_COMMAND", "CNI_CONTAINERID", "CNI_NETNS", "CNI_IFNAME", "CNI_ARGS", "CNI_PATH",
            ]),
            prop_oneof![".{0,20}", prop::sample::select(vec!["ADD", "DEL", "CHECK", "GC", "STATUS", "VERSION"]).prop_map(String::from)],
            0..6,
        )
    ) {
        if let Err(e) = CniEnv::from_lookup(|k| vars.get(k).cloned()) {
            prop_assert_eq!(e.code(), 4);
        }
    }

    #[test]
    fn store_records_never_panic(record in json_value(), bytes in prop::collection::vec(any::<u8>(), 0..256)) {
        let _ = serde_json::from_value::<Record>(record);
        let _ = serde_json::from_slice::<Record>(&bytes);
    }
}
