//! Serial console capture: with `serial_host`/`serial_port` set (a ser2net-style TCP
//! port), the bytes read during a stage go to `<phase>-serial.log`, which the agent
//! uploads as the job's serial log.

use crate::config::DeviceConfig;
use crate::stage::Stage;
use std::io::Write;
use std::path::Path;
use std::time::Duration;
use tokio::io::AsyncReadExt;
use tokio::net::TcpStream;
use tokio::sync::oneshot;
use tokio::task::JoinHandle;

/// A running capture; [`SerialCapture::stop`] ends it.
pub struct SerialCapture {
    stop: oneshot::Sender<()>,
    task: JoinHandle<()>,
}

/// How long to keep reading what is already buffered once the stage has ended.
const DRAIN: Duration = Duration::from_millis(200);
const CONNECT_TIMEOUT: Duration = Duration::from_secs(5);

impl SerialCapture {
    /// Starts capturing when the device config names a serial console.
    ///
    /// Never fails the stage: a console that cannot be reached is reported on stderr.
    pub async fn start(cfg: &DeviceConfig, dir: &Path, stage: Stage) -> Option<SerialCapture> {
        let host = cfg.serial_host.clone()?;
        let port = cfg.serial_port?;
        let path = dir.join(format!("{}-serial.log", stage.phase()));
        // Connect before the stage starts, so its first output is not missed.
        let connect = TcpStream::connect((host.as_str(), port));
        let mut stream = match tokio::time::timeout(CONNECT_TIMEOUT, connect).await {
            Ok(Ok(s)) => s,
            Ok(Err(e)) => {
                eprintln!("warning: serial console {host}:{port}: {e}; not captured");
                return None;
            }
            Err(_) => {
                eprintln!("warning: serial console {host}:{port}: connect timed out; not captured");
                return None;
            }
        };
        let (stop, mut stopped) = oneshot::channel::<()>();
        let task = tokio::spawn(async move {
            let mut file = match std::fs::OpenOptions::new()
                .create(true)
                .append(true)
                .open(&path)
            {
                Ok(f) => f,
                Err(e) => {
                    eprintln!(
                        "warning: cannot write {}: {e}; serial not captured",
                        path.display()
                    );
                    return;
                }
            };
            let mut buf = vec![0u8; 16 * 1024];
            loop {
                tokio::select! {
                    r = stream.read(&mut buf) => match r {
                        Ok(0) | Err(_) => return,
                        Ok(n) => {
                            if file.write_all(&buf[..n]).is_err() {
                                return;
                            }
                        }
                    },
                    _ = &mut stopped => break,
                }
            }
            // The stage is over: keep what the console already sent, then let go.
            while let Ok(Ok(n)) = tokio::time::timeout(DRAIN, stream.read(&mut buf)).await {
                if n == 0 || file.write_all(&buf[..n]).is_err() {
                    break;
                }
            }
        });
        Some(SerialCapture { stop, task })
    }

    /// Stops the capture and waits (bounded) for the log to be written.
    pub async fn stop(self) {
        let _ = self.stop.send(());
        let _ = tokio::time::timeout(Duration::from_secs(2), self.task).await;
    }
}
