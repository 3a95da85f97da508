//! N concurrent ADDs on one network (all started at once behind a barrier, each killed if it
//! outlives the deadline), then N concurrent DELs; wg-cni and ptp in alternating rounds.

use std::sync::{Barrier, Mutex};
use std::time::{Duration, Instant};

use serde_json::{json, Value};

use crate::cni::{self, Call, Plugin};
use crate::exec::{self, Exec};
use crate::stats::{raw_ms, summary_ms};
use crate::{ns, Ctx, Res};

struct Round {
    add_wall_us: f64,
    add: Vec<Exec>,
    del_wall_us: f64,
    del: Vec<Exec>,
    killed: usize,
}

/// Run `command` for all pods at once; `prev` gives each pod's prevResult.
fn burst(
    ctx: &Ctx,
    plugin: &Plugin,
    command: &str,
    pods: &[(String, String)],
    prev: &[Option<Value>],
    deadline: Duration,
) -> Res<(f64, Vec<Exec>, usize)> {
    let barrier = Barrier::new(pods.len() + 1);
    let pids: Mutex<Vec<i32>> = Mutex::new(Vec::new());
    let done = std::sync::atomic::AtomicBool::new(false);
    let killed = std::sync::atomic::AtomicUsize::new(0);
    let mut wall = 0.0;
    let results: Vec<Res<Exec>> = std::thread::scope(|scope| {
        let handles: Vec<_> = pods
            .iter()
            .enumerate()
            .map(|(i, (cid, netns))| {
                let barrier = &barrier;
                let pids = &pids;
                let prev = prev.get(i).and_then(|p| p.as_ref());
                scope.spawn(move || {
                    let stderr = ctx
                        .work
                        .join("logs")
                        .join(format!("par-{}-{command}-{i}.err", plugin.kind));
                    let on_spawn = |pid: i32| pids.lock().unwrap().push(pid);
                    barrier.wait();
                    plugin.call(
                        ctx,
                        &Call {
                            command,
                            container_id: cid,
                            netns,
                            prev,
                            stderr: &stderr,
                            on_spawn: Some(&on_spawn),
                        },
                    )
                })
            })
            .collect();
        // Watchdog: past the deadline every plugin still running is killed (a failure).
        let watchdog = scope.spawn(|| {
            let t0 = Instant::now();
            while !done.load(std::sync::atomic::Ordering::SeqCst) {
                if t0.elapsed() > deadline {
                    let p = pids.lock().unwrap().clone();
                    killed.store(p.len(), std::sync::atomic::Ordering::SeqCst);
                    exec::kill_if_running(&p);
                    break;
                }
                std::thread::sleep(Duration::from_millis(50));
            }
        });
        barrier.wait();
        let start = Instant::now();
        let r: Vec<Res<Exec>> = handles.into_iter().map(|h| h.join().unwrap()).collect();
        wall = start.elapsed().as_secs_f64() * 1e6;
        done.store(true, std::sync::atomic::Ordering::SeqCst);
        let _ = watchdog.join();
        r
    });
    let execs: Vec<Exec> = results.into_iter().collect::<Res<_>>()?;
    let k = if execs.iter().any(|e| e.code == 128 + libc::SIGKILL) {
        killed.load(std::sync::atomic::Ordering::SeqCst)
    } else {
        0
    };
    Ok((wall, execs, k))
}

fn round(ctx: &Ctx, plugin: &Plugin, n: usize, tag: &str, deadline: Duration) -> Res<Round> {
    let mut pods = Vec::new();
    for i in 0..n {
        let name = format!("wgbench-q{i}");
        let path = ns::add(ctx, &name)?;
        pods.push((format!("par-{tag}-{i}"), path));
    }
    let outcome = (|| {
        let (add_wall_us, add, killed_add) = burst(ctx, plugin, "ADD", &pods, &[], deadline)?;
        let prev: Vec<Option<Value>> = add
            .iter()
            .map(|e| if e.ok() { e.json() } else { None })
            .collect();
        let (del_wall_us, del, killed_del) = burst(ctx, plugin, "DEL", &pods, &prev, deadline)?;
        Ok(Round {
            add_wall_us,
            add,
            del_wall_us,
            del,
            killed: killed_add + killed_del,
        })
    })();
    for i in 0..n {
        ns::del(ctx, &format!("wgbench-q{i}"));
    }
    outcome
}

pub fn run(ctx: &Ctx) -> Res<Value> {
    let n = ctx.opts.num("parallel-n", 100);
    let rounds = ctx.opts.num("parallel-rounds", 2);
    let deadline = Duration::from_secs(ctx.opts.num("parallel-deadline", 120) as u64);
    std::fs::create_dir_all(ctx.work.join("logs")).map_err(|e| e.to_string())?;
    let wg = cni::wg(ctx, "wgbench-par", "10.200.8.0/24", "57000-57299");
    let ptp = cni::ptp(ctx, "wgbench-parptp", "10.200.9.0/24");
    let mut out = json!({"n": n, "rounds": rounds, "deadline_s": deadline.as_secs()});
    let mut per: [Vec<Round>; 2] = [Vec::new(), Vec::new()];
    for r in 0..rounds {
        let order: [usize; 2] = if r % 2 == 0 { [0, 1] } else { [1, 0] };
        for &k in &order {
            let plugin = if k == 0 { &wg } else { &ptp };
            per[k].push(round(ctx, plugin, n, &format!("{r}"), deadline)?);
            crate::log(format!(
                "[{}] parallel: round {r} {} done",
                ctx.label, plugin.kind
            ));
        }
    }
    for (k, kind) in ["wg-cni", "ptp"].iter().enumerate() {
        let rounds = &per[k];
        let lat = |sel: fn(&Round) -> &Vec<Exec>| -> Vec<f64> {
            rounds
                .iter()
                .flat_map(|r| sel(r).iter().filter(|e| e.ok()).map(|e| e.us))
                .collect()
        };
        let fails = |sel: fn(&Round) -> &Vec<Exec>| -> usize {
            rounds
                .iter()
                .map(|r| sel(r).iter().filter(|e| !e.ok()).count())
                .sum()
        };
        let errors: Vec<String> = rounds
            .iter()
            .flat_map(|r| {
                r.add
                    .iter()
                    .chain(r.del.iter())
                    .filter(|e| !e.ok())
                    .map(|e| e.why())
            })
            .take(3)
            .collect();
        let add_walls: Vec<f64> = rounds.iter().map(|r| r.add_wall_us).collect();
        let del_walls: Vec<f64> = rounds.iter().map(|r| r.del_wall_us).collect();
        out[*kind] = json!({
            "add_wall_ms": raw_ms(&add_walls),
            "del_wall_ms": raw_ms(&del_walls),
            "add": summary_ms(&lat(|r| &r.add)),
            "del": summary_ms(&lat(|r| &r.del)),
            "add_failures": fails(|r| &r.add),
            "del_failures": fails(|r| &r.del),
            "killed": rounds.iter().map(|r| r.killed).sum::<usize>(),
            "errors": errors,
            "add_rss_kb_max": rounds.iter().flat_map(|r| r.add.iter().map(|e| e.rss_kb)).max(),
        });
    }
    Ok(out)
}
