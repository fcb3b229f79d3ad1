//! A stand-in for `walrelay serve` used only by the harness self-tests of
//! `chaos_tests::relay`: it takes the same flags, answers `/-/ready`,
//! `/api/v1/status` (echoing its arguments), `/metrics` and accepts writes,
//! and counts its starts in the data directory. Not a relay.

use std::io::{BufRead, BufReader, Read, Write};
use std::net::{TcpListener, TcpStream};
use std::path::PathBuf;

use anyhow::{bail, Context, Result};

fn main() -> Result<()> {
    let args: Vec<String> = std::env::args().skip(1).collect();
    if args.first().map(String::as_str) != Some("serve") {
        bail!("usage: fake-walrelay serve --listen ADDR --data-dir DIR [--replica N=URL]...");
    }
    let flag = |name: &str| {
        args.iter()
            .position(|a| a == name)
            .and_then(|i| args.get(i + 1))
            .cloned()
    };
    let listen = flag("--listen").context("--listen is required")?;
    let data_dir = PathBuf::from(flag("--data-dir").context("--data-dir is required")?);
    std::fs::create_dir_all(&data_dir)?;
    let starts_file = data_dir.join("fake-starts");
    let mut starts = std::fs::read_to_string(&starts_file).unwrap_or_default();
    starts.push_str("start\n");
    std::fs::write(&starts_file, &starts)?;
    let starts = starts.lines().count();
    let listener = TcpListener::bind(&listen).with_context(|| format!("bind {listen}"))?;
    eprintln!("fake-walrelay listening on {listen}");
    let status = serde_json::json!({ "args": args, "starts": starts, "pid": std::process::id() });
    for conn in listener.incoming() {
        let Ok(conn) = conn else { continue };
        let status = status.to_string();
        std::thread::spawn(move || {
            let _ = serve(conn, &status, starts);
        });
    }
    Ok(())
}

fn serve(conn: TcpStream, status: &str, starts: usize) -> Result<()> {
    conn.set_nodelay(true)?;
    let mut reader = BufReader::new(conn.try_clone()?);
    let mut out = conn;
    loop {
        let mut request_line = String::new();
        if reader.read_line(&mut request_line)? == 0 {
            return Ok(());
        }
        let mut content_length = 0usize;
        loop {
            let mut line = String::new();
            reader.read_line(&mut line)?;
            let line = line.trim_end();
            if line.is_empty() {
                break;
            }
            if let Some((k, v)) = line.split_once(':') {
                if k.eq_ignore_ascii_case("content-length") {
                    content_length = v.trim().parse()?;
                }
            }
        }
        let mut body = vec![0u8; content_length];
        reader.read_exact(&mut body)?;
        let path = request_line.split(' ').nth(1).unwrap_or("/");
        let (code, ctype, text) = match path {
            "/-/ready" | "/-/healthy" => ("200 OK", "text/plain", "ready\n".to_string()),
            "/api/v1/status" => ("200 OK", "application/json", status.to_string()),
            "/metrics" => (
                "200 OK",
                "text/plain; version=0.0.4",
                format!("# TYPE walrelay_fake_starts gauge\nwalrelay_fake_starts {starts}\n"),
            ),
            "/api/v1/write" => ("204 No Content", "text/plain", String::new()),
            _ => ("404 Not Found", "text/plain", "not found\n".to_string()),
        };
        let resp = format!(
            "HTTP/1.1 {code}\r\nContent-Type: {ctype}\r\nContent-Length: {}\r\n\r\n{text}",
            text.len()
        );
        out.write_all(resp.as_bytes())?;
    }
}
