use matchlock_sdk::{Client, Error, Sandbox};

/// Boots a sandbox, runs a command and shuts it down.
pub async fn quickstart(image: &str) -> Result<String, Error> {
    let client = Client::start().await?;
    let sandbox = Sandbox::new(image)
        .with_cpus(1.0)
        .with_memory(256)
        .with_env("GREETING", "hello");
    let id = client.create(&sandbox).await?;
    let result = client.exec("echo $GREETING from $(hostname)").await?;
    assert_eq!(result.exit_code, 0);
    println!("{id}: {}", result.stdout_str().trim());
    client.close(std::time::Duration::from_secs(2)).await?;
    client.remove().await?;
    Ok(result.stdout_str())
}

#[tokio::main]
async fn main() -> Result<(), Error> {
    let image = std::env::args()
        .nth(1)
        .unwrap_or_else(|| "alpine:latest".into());
    quickstart(&image).await.map(|_| ())
}
