//! Serial console capture into `<phase>-serial.log`.

use crate::support::{Run, code, free_port, stderr};
use serde_json::json;
use std::io::{Read, Write};
use std::net::TcpListener;

#[test]
fn serial_console_is_captured_for_the_stage() {
    let listener = TcpListener::bind("127.0.0.1:0").expect("bind");
    let port = listener.local_addr().expect("addr").port();
    std::thread::spawn(move || {
        for stream in listener.incoming() {
            let Ok(mut s) = stream else { continue };
            let _ = s.write_all(b"[    0.000] Booting Linux on physical CPU 0x0\r\nlogin: ");
            // Hold the line open until the connector hangs up, like ser2net.
            let mut buf = [0u8; 64];
            while matches!(s.read(&mut buf), Ok(n) if n > 0) {}
        }
    });
    // The test itself waits (bounded) until the console text is in the log, so it
    // proves capture runs while the stage runs.
    let job = json!({"job_queue": "q", "test_data": {"test_cmds":
        "for i in $(seq 200); do grep -q 'Booting Linux' test-serial.log 2>/dev/null && exit 0; sleep 0.05; done; exit 9"}});
    let run = Run::new(
        &format!("device_ip: 10.0.0.9\nserial_host: 127.0.0.1\nserial_port: {port}\n"),
        &job,
    );
    let out = run.run("fake", "runtest");
    assert_eq!(code(&out), 0, "{}", stderr(&out));
    let log = run.read("test-serial.log");
    assert!(log.contains("Booting Linux on physical CPU 0x0"), "{log:?}");
    assert!(log.ends_with("login: "), "{log:?}");

    // Each stage gets its own file, named by the agent's phase name.
    let out = run.run("fake", "provision");
    assert_eq!(code(&out), 0);
    assert!(run.path().join("provision-serial.log").exists());
}

#[test]
fn unreachable_serial_console_does_not_fail_the_stage() {
    let port = free_port();
    let job = json!({"job_queue": "q", "test_data": {"test_cmds": "exit 0"}});
    let run = Run::new(
        &format!("serial_host: 127.0.0.1\nserial_port: {port}\n"),
        &job,
    );
    let out = run.run("fake", "runtest");
    assert_eq!(code(&out), 0);
    assert!(stderr(&out).contains("serial console"), "{}", stderr(&out));
    assert!(!run.path().join("test-serial.log").exists());
}
