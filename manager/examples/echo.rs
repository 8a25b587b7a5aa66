//! An echo server and a client, both in this process, talking over TCP on
//! loopback through flow managers.
//!
//! ```sh
//! cargo run --release -p flow-manager --example echo
//! ```

use std::sync::Arc;
use std::time::Duration;

use flow::auth::AllowEveryone;
use flow::security::Principal;
use flow_manager::Manager;

#[tokio::main]
async fn main() -> flow::Result<()> {
    // The server: listen, then echo every flow until its peer half-closes.
    let server = Manager::builder(Principal::with_self_blessing("echo-server")?).build();
    let endpoint = server
        .listen("tcp", "127.0.0.1:0")
        .await?
        .endpoint()
        .clone();
    println!("server listening at {endpoint}");
    tokio::spawn({
        let server = server.clone();
        async move {
            while let Ok(mut flow) = server.accept().await {
                tokio::spawn(async move {
                    while let Ok(Some(chunk)) = flow.read_msg().await {
                        if flow.write_msg(&[&chunk]).await.is_err() {
                            return;
                        }
                    }
                    flow.close_write();
                });
            }
        }
    });

    // The client: dial, write, half-close, read the echo.
    let client = Manager::builder(Principal::with_self_blessing("echo-client")?).build();
    for line in ["hello", "flows are cheap", "goodbye"] {
        let mut flow = client
            .dial(&endpoint, Arc::new(AllowEveryone), Duration::ZERO)
            .await?;
        flow.write_msg_and_close(&[line.as_bytes()]).await?;
        let mut echoed = Vec::new();
        while let Some(chunk) = flow.read_msg().await? {
            echoed.extend_from_slice(&chunk);
        }
        println!(
            "{} said back {:?}",
            flow.remote_blessings(),
            String::from_utf8_lossy(&echoed)
        );
    }
    println!(
        "all flows shared {} connection(s)",
        client.connections().len()
    );
    client.close().await;
    server.close().await;
    Ok(())
}
