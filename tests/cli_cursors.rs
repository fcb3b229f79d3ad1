//! `walrelay cursors list|set|reset` on the checkpoints a real relay wrote,
//! and the refusal to move them while a relay holds the data dir.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod cli_common;

use std::time::Duration;

use chaos_tests::ports::free_port;
use chaos_tests::relay::Relay;
use cli_common::*;
use serde_json::Value;

fn cursor_of(list: &Value, name: &str) -> Value {
    list.as_array()
        .unwrap()
        .iter()
        .find(|r| r["replica"] == name)
        .cloned()
        .unwrap_or(Value::Null)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cursors_cannot_move_while_the_relay_runs_and_move_to_seq_time_head_and_tail_after() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path();
    // A replica nobody listens on: its shipper retries and stays at 0.
    let down = format!("http://127.0.0.1:{}/api/v1/write", free_port());
    let mut relay =
        Relay::start_with_bin(BIN, dir, &[("down", &down)], &["--retry-max-backoff", "1s"])
            .await
            .unwrap();
    let t = Traffic {
        metric: "cli_cursor_total".into(),
        requests: 10,
        series: 3,
        samples_per_series: 2,
    };
    let before = now_ms();
    post_traffic(&relay, &t).await;
    let pid = relay.pid().unwrap().to_string();

    for cmd in [&["cursors", "set"][..], &["cursors", "reset"]] {
        let more: &[&str] = if cmd[1] == "set" {
            &["--replica", "down", "--tail"]
        } else {
            &["--replica", "down"]
        };
        let o = cli_dir(cmd, dir, more);
        expect_code(&o, 1, &format!("{cmd:?} while the relay runs"));
        let err = stderr(&o);
        assert!(err.contains("refusing"), "{err}");
        assert!(err.contains(&format!("pid {pid}")), "names the pid: {err}");
    }
    // Read-only commands still work on the log, and say why cursors don't.
    let o = cli_dir(&["wal", "inspect"], dir, &["--json"]);
    expect_code(&o, 0, "inspect while the relay runs");
    let v = json(&o);
    assert_eq!(v["relay_running_pid"], pid.as_str());
    assert!(
        v["replicas_unavailable"].as_str().unwrap().contains(&pid),
        "{v:#}"
    );
    assert_eq!(v["totals"]["records"], 10);
    let o = cli_dir(&["cursors", "list"], dir, &[]);
    expect_code(&o, 1, "cursors list while the relay runs");
    assert!(stderr(&o).contains(&pid), "{}", stderr(&o));

    relay.stop(Duration::from_secs(30)).await.unwrap();

    let o = cli_dir(&["cursors", "list"], dir, &["--json"]);
    expect_code(&o, 0, "cursors list");
    let c = cursor_of(&json(&o), "down");
    assert_eq!(c["delivered"], 0, "{c}");
    assert_eq!(c["lag_records"], 10);
    let lag = c["lag_seconds"].as_f64().unwrap();
    assert!(lag > 0.0 && lag < 300.0, "{c}");
    let o = cli_dir(&["cursors", "list"], dir, &[]);
    expect_code(&o, 0, "cursors list (text)");
    assert!(stdout(&o).contains("down"), "{}", stdout(&o));

    let set = |how: &[&str]| {
        let mut more = vec!["--replica", "down", "--json"];
        more.extend(how);
        let o = cli_dir(&["cursors", "set"], dir, &more);
        expect_code(&o, 0, &format!("cursors set {how:?}"));
        json(&o)["delivered"].as_u64().unwrap()
    };
    assert_eq!(set(&["--seq", "4"]), 4);
    assert_eq!(set(&["--head"]), 10);
    assert_eq!(set(&["--tail"]), 0);
    // The first record received at or after a time: the 7th was received
    // after the 6th, so its own receive time selects it.
    let o = cli_dir(
        &["wal", "dump"],
        dir,
        &["--json", "--from-seq", "7", "--to-seq", "7"],
    );
    let t7: Value = serde_json::from_str(stdout(&o).lines().next().unwrap()).unwrap();
    let t7 = t7["receive_time_ms"].as_i64().unwrap();
    let at = set(&["--time", &t7.to_string()]);
    assert!(at <= 7, "{at}");
    let o = cli_dir(
        &["wal", "dump"],
        dir,
        &["--json", "--to-seq", &at.to_string()],
    );
    let times: Vec<i64> = stdout(&o)
        .lines()
        .map(|l| {
            serde_json::from_str::<Value>(l).unwrap()["receive_time_ms"]
                .as_i64()
                .unwrap()
        })
        .collect();
    assert!(times[at as usize] >= t7 && times[..at as usize].iter().all(|&x| x < t7));
    assert_eq!(set(&["--time", &(before - 60_000).to_string()]), 0);
    assert_eq!(set(&["--time", "2999-01-01T00:00:00Z"]), 10);

    let o = cli_dir(
        &["cursors", "set"],
        dir,
        &["--replica", "down", "--seq", "11"],
    );
    expect_code(&o, 1, "a position past the end");
    assert!(stderr(&o).contains("past the end"), "{}", stderr(&o));
    let o = cli_dir(&["cursors", "set"], dir, &["--replica", "typo", "--head"]);
    expect_code(&o, 1, "an unknown replica");
    assert!(
        stderr(&o).contains("down"),
        "lists the known ones: {}",
        stderr(&o)
    );
    let o = cli_dir(&["cursors", "set"], dir, &["--replica", "down"]);
    expect_code(&o, 2, "set without a target");

    let o = cli_dir(&["cursors", "reset"], dir, &["--replica", "down"]);
    expect_code(&o, 0, "cursors reset");
    let o = cli_dir(&["cursors", "list"], dir, &["--json"]);
    assert!(cursor_of(&json(&o), "down").is_null(), "{}", stdout(&o));

    // The relay honours the moved cursor: set it mid-log, restart, and its
    // status shows that position (the replica is still down).
    let o = cli_dir(
        &["cursors", "set"],
        dir,
        &["--replica", "down", "--seq", "6", "--create"],
    );
    expect_code(&o, 0, "set --create");
    relay.restart().await.unwrap();
    let status = relay.status().await.unwrap();
    assert_eq!(status["replicas"][0]["cursor"], 6, "{status:#}");
    assert_eq!(status["replicas"][0]["lag_records"], 4, "{status:#}");
    relay.stop(Duration::from_secs(30)).await.unwrap();
}

/// A replica delivered by shards has a cursor per shard; `cursors list`
/// shows them and the lowest as the replica's, and `cursors set` moves the
/// replica as a whole: one cursor, which a relay started again splits into
/// its shards at that position.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_sharded_replica_is_listed_by_shard_and_moved_as_a_whole() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path();
    let down = format!("http://127.0.0.1:{}/api/v1/write", free_port());
    let flags = ["--retry-max-backoff", "1s", "--replica-shards", "down=3"];
    let mut relay = Relay::start_with_bin(BIN, dir, &[("down", &down)], &flags)
        .await
        .unwrap();
    let t = Traffic {
        metric: "cli_cursor_shards_total".into(),
        requests: 10,
        series: 6,
        samples_per_series: 2,
    };
    post_traffic(&relay, &t).await;
    let r = wait_shards(&relay, 3).await;
    assert_eq!(r["shard_cursors"].as_array().unwrap().len(), 3, "{r:#}");
    relay.stop(Duration::from_secs(30)).await.unwrap();

    let o = cli_dir(&["cursors", "list"], dir, &["--json"]);
    expect_code(&o, 0, "cursors list");
    let c = cursor_of(&json(&o), "down");
    assert_eq!(c["shards"], 3, "{c:#}");
    assert_eq!(c["delivered"], 0, "{c:#}");
    assert_eq!(c["shard_cursors"].as_array().unwrap().len(), 3, "{c:#}");
    let o = cli_dir(&["cursors", "list"], dir, &[]);
    assert!(stdout(&o).contains("SHARDS"), "{}", stdout(&o));

    let o = cli_dir(
        &["cursors", "set"],
        dir,
        &["--replica", "down", "--head", "--json"],
    );
    expect_code(&o, 0, "cursors set --head");
    let o = cli_dir(&["cursors", "list"], dir, &["--json"]);
    let c = cursor_of(&json(&o), "down");
    assert_eq!(
        (c["delivered"].as_u64(), c["shards"].as_u64()),
        (Some(10), Some(1)),
        "{c:#}"
    );
    assert!(c.get("shard_cursors").is_none(), "{c:#}");

    relay.restart().await.unwrap();
    let r = wait_shards(&relay, 3).await;
    assert_eq!(r["cursor"], 10, "{r:#}");
    relay.stop(Duration::from_secs(30)).await.unwrap();
    let o = cli_dir(&["cursors", "list"], dir, &["--json"]);
    let c = cursor_of(&json(&o), "down");
    assert_eq!(c["shards"], 3, "split again into its shards: {c:#}");
    assert!(
        c["shard_cursors"]
            .as_array()
            .unwrap()
            .iter()
            .all(|s| s["delivered"] == 10),
        "{c:#}"
    );
}

/// The status of the relay's one replica once it has `n` shards.
async fn wait_shards(relay: &Relay, n: u64) -> Value {
    let deadline = std::time::Instant::now() + Duration::from_secs(30);
    loop {
        let st = relay.status().await.unwrap();
        let r = st["replicas"][0].clone();
        if r["shards"] == n {
            return r;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "{n} shards not seen: {r:#}"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}
