//! Sets, reads and deletes a key through the shard-aware client.
//!
//! ```text
//! ADDR=127.0.0.1:50051 cargo run --release --bin distributed-cache &
//! cargo run --release -p cache-client --example hello -- 127.0.0.1:50051
//! ```

use cache_client::{Client, Config, Consistency, Options};
use std::time::Duration;

#[tokio::main(flavor = "current_thread")]
async fn main() -> Result<(), Box<dyn std::error::Error>> {
    let seeds: Vec<String> = std::env::args().skip(1).collect();
    let seeds = if seeds.is_empty() {
        vec!["127.0.0.1:50051".to_string()]
    } else {
        seeds
    };
    let client = Client::connect(Config::new(seeds)).await?;
    client
        .set("hello", "world", Some(Duration::from_secs(60)))
        .await?;
    let value = client
        .get_with("hello", Options::default().consistency(Consistency::One))
        .await?;
    println!(
        "hello = {:?} (replicas: {:?})",
        value,
        client.replicas("hello")
    );
    println!("deleted: {}", client.delete("hello").await?);
    println!("after delete: {:?}", client.get("hello").await?);
    Ok(())
}
