//! Open/close churn of 100,000 flows on one connection over TCP: each is
//! opened, echoes one byte, and is closed on both sides; afterwards both
//! flow tables are empty and the connection still works.

use flow::conn::FlowOptions;
use flow_tests::*;

const FLOWS: u64 = 100_000;
const WORKERS: u64 = 32;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_hundred_thousand_flows_open_echo_and_close() {
    let (d, a) = conn_pair().await;
    let echo = spawn_echo(a.clone());
    let started = std::time::Instant::now();
    let mut workers = Vec::new();
    for w in 0..WORKERS {
        let d = d.clone();
        workers.push(tokio::spawn(async move {
            let mut n = 0u64;
            let mut i = w;
            while i < FLOWS {
                let byte = [(i % 251) as u8];
                let mut flow = d.open_flow(FlowOptions::default())?;
                flow.write_msg_and_close(&[&byte]).await?;
                let back = read_to_end(&mut flow).await?;
                assert_eq!(back, byte, "flow {i}");
                n += 1;
                i += WORKERS;
            }
            Ok::<_, flow::Error>(n)
        }));
    }
    let mut done = 0;
    within(LONG, async {
        for w in workers {
            done += w.await.unwrap().unwrap();
        }
    })
    .await;
    assert_eq!(done, FLOWS);
    eventually(SHORT, "both flow tables empty", || {
        d.stats().flows_open == 0 && a.stats().flows_open == 0
    })
    .await;
    let elapsed = started.elapsed();
    let (ds, as_) = (d.stats(), a.stats());
    assert_eq!((ds.flows_opened, ds.flows_closed), (FLOWS, FLOWS));
    assert_eq!((as_.flows_opened, as_.flows_closed), (FLOWS, FLOWS));
    assert_eq!(ds.bytes_sent, FLOWS);
    assert_eq!(as_.bytes_received, FLOWS);
    assert!(d.is_idle() && a.is_idle());

    // The connection still works, both ways.
    let mut flow = d.open_flow(FlowOptions::default()).unwrap();
    flow.write_msg_and_close(&[b"still here"]).await.unwrap();
    assert_eq!(
        within(SHORT, read_to_end(&mut flow)).await.unwrap(),
        b"still here"
    );
    echo.abort();
    let back = spawn_echo(d.clone());
    let mut flow = a.open_flow(FlowOptions::default()).unwrap();
    flow.write_msg_and_close(&[b"and back"]).await.unwrap();
    assert_eq!(
        within(SHORT, read_to_end(&mut flow)).await.unwrap(),
        b"and back"
    );
    back.abort();
    eprintln!(
        "{FLOWS} flows in {elapsed:.2?} ({:.0} flows/s)",
        FLOWS as f64 / elapsed.as_secs_f64()
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn both_sides_churn_flows_at_once() {
    // 20,000 flows opened from each side concurrently, each echoing one
    // byte: ids from both sides interleave on the wire.
    const EACH: u64 = 20_000;
    let (d, a) = conn_pair().await;
    let echo_d = spawn_echo(d.clone());
    let echo_a = spawn_echo(a.clone());
    let mut workers = Vec::new();
    for (side, conn) in [(0u64, d.clone()), (1, a.clone())] {
        for w in 0..16u64 {
            let conn = conn.clone();
            workers.push(tokio::spawn(async move {
                let mut i = w;
                while i < EACH {
                    let byte = [(i * 2 + side) as u8];
                    let mut flow = conn.open_flow(FlowOptions::default())?;
                    flow.write_msg_and_close(&[&byte]).await?;
                    assert_eq!(read_to_end(&mut flow).await?, byte);
                    i += 16;
                }
                Ok::<_, flow::Error>(())
            }));
        }
    }
    within(LONG, async {
        for w in workers {
            w.await.unwrap().unwrap();
        }
    })
    .await;
    eventually(SHORT, "both flow tables empty", || {
        d.stats().flows_open == 0 && a.stats().flows_open == 0
    })
    .await;
    assert_eq!(d.stats().flows_opened, 2 * EACH);
    assert_eq!(a.stats().flows_opened, 2 * EACH);
    assert_eq!(d.stats().flows_closed, 2 * EACH);
    assert_eq!(a.stats().flows_closed, 2 * EACH);
    echo_d.abort();
    echo_a.abort();
}
