use matchlock_sdk::{Client, Error, ExecOptions, Sandbox};
use std::time::Duration;

/// Streams output, pipes stdin, moves files and shows that timeouts kill the command.
pub async fn pipes_and_files(image: &str) -> Result<(), Error> {
    let client = Client::start().await?;
    client.create(&Sandbox::new(image)).await?;

    // Output as it arrives, to any AsyncWrite.
    let (mut out, mut err) = (Vec::new(), Vec::new());
    let info = client
        .exec_stream(
            "echo out; echo err >&2; exit 3",
            &ExecOptions::default(),
            &mut out,
            &mut err,
        )
        .await?;
    assert_eq!(
        (info.exit_code, &out[..], &err[..]),
        (3, &b"out\n"[..], &b"err\n"[..])
    );

    // Stdin from any AsyncRead.
    let mut counted = Vec::new();
    let stdin = std::io::Cursor::new(vec![7u8; 100_000]);
    client
        .exec_pipe(
            "wc -c",
            &ExecOptions::default(),
            stdin,
            &mut counted,
            &mut tokio::io::sink(),
        )
        .await?;
    assert_eq!(String::from_utf8_lossy(&counted).trim(), "100000");

    // Files, binary-safe.
    let blob: Vec<u8> = (0..=255).collect();
    client.write_file("/data/blob.bin", &blob, 0o600).await?;
    assert_eq!(client.read_file("/data/blob.bin").await?, blob);
    let names: Vec<String> = client
        .list_files("/data")
        .await?
        .into_iter()
        .map(|f| f.name)
        .collect();
    assert_eq!(names, ["blob.bin"]);

    // A timeout cancels the command in the sandbox.
    let slow = ExecOptions {
        timeout: Some(Duration::from_secs(1)),
        ..Default::default()
    };
    assert!(matches!(
        client.exec_with("sleep 600", &slow).await,
        Err(Error::Timeout(_))
    ));

    client.close(Duration::from_secs(2)).await
}

#[tokio::main]
async fn main() -> Result<(), Error> {
    let image = std::env::args()
        .nth(1)
        .unwrap_or_else(|| "alpine:latest".into());
    pipes_and_files(&image).await
}
