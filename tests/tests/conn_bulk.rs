//! One gibibyte through one flow over TCP on loopback, checked byte for
//! byte against a pattern both sides generate, and by checksum.

use std::time::Instant;

use flow::conn::FlowOptions;
use flow_tests::*;
use tokio::io::AsyncWriteExt;

const TOTAL: u64 = 1 << 30;
const SEED: u64 = 0x1_6b;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn one_gibibyte_through_one_flow_with_a_checksum() {
    let (d, a) = conn_pair().await;
    let started = Instant::now();
    let sender = tokio::spawn(async move {
        let mut flow = d.open_flow(FlowOptions::default())?;
        let mut pattern = Pattern::new(SEED);
        // Write sizes vary (1 byte .. 256 KiB) so that fragmentation and
        // coalescing both happen.
        let mut sizes = Pattern::new(SEED ^ 0xffff);
        let mut sum = Checksum::new();
        let mut buf = vec![0u8; 256 * 1024];
        let mut sent = 0u64;
        while sent < TOTAL {
            let want = 1 + (sizes.next_u64() % buf.len() as u64);
            let n = want.min(TOTAL - sent) as usize;
            pattern.fill(&mut buf[..n]);
            sum.update(&buf[..n]);
            flow.write_all(&buf[..n])
                .await
                .map_err(|e| flow::Error::network(format!("write after {sent} bytes: {e}")))?;
            sent += n as u64;
        }
        flow.shutdown()
            .await
            .map_err(|e| flow::Error::network(e.to_string()))?;
        // Hold the flow until the receiver has everything and closes back.
        let tail = read_to_end(&mut flow).await?;
        assert!(tail.is_empty());
        Ok::<_, flow::Error>((sum.finish(), d))
    });

    let mut flow = within(SHORT, a.accept_flow()).await.unwrap();
    let mut expect = Pattern::new(SEED);
    let mut sum = Checksum::new();
    let mut scratch = Vec::new();
    let mut got = 0u64;
    within(LONG, async {
        while let Some(chunk) = flow.read_msg().await.unwrap() {
            scratch.resize(chunk.len(), 0);
            expect.fill(&mut scratch);
            if scratch[..] != chunk[..] {
                let at = scratch.iter().zip(chunk.iter()).position(|(x, y)| x != y);
                panic!(
                    "corrupted: chunk of {} bytes at offset {got} differs at {at:?}",
                    chunk.len()
                );
            }
            sum.update(&chunk);
            got += chunk.len() as u64;
        }
    })
    .await;
    flow.close_write();
    let (sent_sum, d) = within(SHORT, sender).await.unwrap().unwrap();
    let elapsed = started.elapsed();
    assert_eq!(got, TOTAL);
    assert_eq!(sum.finish(), sent_sum);
    assert_eq!(sent_sum.0, TOTAL);
    assert_eq!(d.stats().bytes_sent, TOTAL);
    assert_eq!(a.stats().bytes_received, TOTAL);
    eprintln!(
        "1 GiB in {elapsed:.2?} ({:.0} MB/s), {} frames",
        TOTAL as f64 / elapsed.as_secs_f64() / 1e6,
        a.stats().frames_received
    );
}
