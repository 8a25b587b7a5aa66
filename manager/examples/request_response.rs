//! A tiny request/response protocol over flows: one flow per request, the
//! request and the response each a whole message. The server authorizes
//! callers by their blessings; the client insists on the server's.
//!
//! ```sh
//! cargo run --release -p flow-manager --example request_response
//! ```

use std::sync::Arc;
use std::time::{Duration, Instant};

use flow::auth::PatternAuthorizer;
use flow::security::{BlessingPattern, Principal};
use flow_manager::Manager;

/// Reads one whole message from the flow (until the peer half-closes).
async fn read_all(flow: &mut flow::conn::Flow) -> flow::Result<Vec<u8>> {
    let mut out = Vec::new();
    while let Some(chunk) = flow.read_msg().await? {
        out.extend_from_slice(&chunk);
    }
    Ok(out)
}

#[tokio::main]
async fn main() -> flow::Result<()> {
    // An organisation blesses both sides; each trusts its root.
    let org = Principal::with_self_blessing("acme")?;
    let bless = |ext: &str| -> flow::Result<Principal> {
        let p = Principal::new();
        let b = org.bless(p.public_key(), &org.default_blessings(), ext, Vec::new())?;
        p.blessing_store().set_default(b.clone())?;
        p.blessing_store().set(b, BlessingPattern::all())?;
        p.add_to_roots(&org.default_blessings())?;
        Ok(p)
    };
    let server = Manager::builder(bless("kv-server")?).build();
    let endpoint = server
        .listen("tcp", "127.0.0.1:0")
        .await?
        .endpoint()
        .clone();

    // The server answers "upper" requests, for acme clients only.
    let callers = BlessingPattern::parse("acme")?;
    tokio::spawn({
        let server = server.clone();
        async move {
            while let Ok(mut flow) = server.accept().await {
                let callers = callers.clone();
                tokio::spawn(async move {
                    let request = read_all(&mut flow).await?;
                    let names = flow.conn().authorized_peer().names.clone();
                    let response = if callers.matched_by(&names) {
                        String::from_utf8_lossy(&request)
                            .to_uppercase()
                            .into_bytes()
                    } else {
                        b"denied".to_vec()
                    };
                    flow.write_msg_and_close(&[&response]).await
                });
            }
        }
    });

    let client = Manager::builder(bless("client")?).build();
    let server_auth = Arc::new(PatternAuthorizer::new([BlessingPattern::parse(
        "acme:kv-server",
    )?]));
    let start = Instant::now();
    let n = 1000;
    for i in 0..n {
        let mut flow = client
            .dial(&endpoint, server_auth.clone(), Duration::ZERO)
            .await?;
        flow.write_msg_and_close(&[format!("request {i}").as_bytes()])
            .await?;
        let response = read_all(&mut flow).await?;
        if i == 0 {
            println!("first response: {}", String::from_utf8_lossy(&response));
        }
    }
    let elapsed = start.elapsed();
    println!(
        "{n} requests in {elapsed:?} ({:.0} per second, one flow each)",
        n as f64 / elapsed.as_secs_f64()
    );
    client.close().await;
    server.close().await;
    Ok(())
}
