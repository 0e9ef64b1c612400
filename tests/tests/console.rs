//! The consortium's console and reports (issue 21), in a real browser: Debian's
//! Chromium, headless, driven over the DevTools protocol. A real coordinator serves the
//! console on loopback while three real sites run a job (one refuses it under its
//! policy); the browser watches the round chart gain points without a reload, reads the
//! refused site's reason, and checks the release's verified signature. The static
//! reports (`models export`'s report, `maeum-audit report --html`, `maeum-site report`)
//! are opened from disk. Screenshots of every page land in `target/console-screenshots/`
//! (kept after the run: CI's artifacts), and in `$MAEUM_SCREENSHOTS` when set
//! (`docs/guides/img/` is made that way).
//!
//! A second test checks access: over TLS only operator certificates get a page.

use std::io::{Read as _, Write as _};
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::Arc;
use std::time::{Duration, Instant};

use chromiumoxide::cdp::browser_protocol::emulation::SetDeviceMetricsOverrideParams;
use chromiumoxide::page::ScreenshotParams;
use chromiumoxide::{Browser, BrowserConfig, Page};
use tokio_stream::StreamExt as _;

use maeum_e2e::{Federation, SMALL_MODEL, bin, run_ok};

const MIN: Duration = Duration::from_secs(60);

fn chromium() -> PathBuf {
    let path = std::env::var_os("MAEUM_CHROMIUM").map_or_else(|| PathBuf::from("/usr/bin/chromium"), PathBuf::from);
    assert!(
        path.exists(),
        "the console's browser tests need Chromium at {} (Debian: apt-get install chromium; or set MAEUM_CHROMIUM)",
        path.display()
    );
    path
}

/// Headless Chromium with one page, driven synchronously (the federation helpers are
/// synchronous).
struct Tab {
    rt: tokio::runtime::Runtime,
    browser: Browser,
    page: Page,
    _profile: tempfile::TempDir,
}

impl Tab {
    fn launch() -> Tab {
        let rt = tokio::runtime::Builder::new_multi_thread().worker_threads(1).enable_all().build().expect("runtime");
        let profile = tempfile::tempdir().expect("profile dir");
        // The flags a closed network needs (no background fetches, no QUIC); no sandbox
        // as root in a container.
        let config = BrowserConfig::builder()
            .chrome_executable(chromium())
            .no_sandbox()
            .user_data_dir(profile.path())
            .window_size(1280, 800)
            .request_timeout(Duration::from_secs(30))
            // A loaded CI machine can take longer than the default 20 s to start it.
            .launch_timeout(Duration::from_secs(90))
            .args([
                "--disable-gpu",
                "--disable-quic",
                "--no-first-run",
                "--disable-background-networking",
                "--disable-component-update",
                "--disable-sync",
                "--hide-scrollbars",
            ])
            .build()
            .expect("browser config");
        let (browser, page) = rt.block_on(async {
            let (browser, mut handler) = Browser::launch(config).await.expect("starting Chromium");
            tokio::spawn(async move { while handler.next().await.is_some() {} });
            let page = browser.new_page("about:blank").await.expect("a page");
            (browser, page)
        });
        let tab = Tab { rt, browser, page, _profile: profile };
        tab.set_width(1280);
        tab
    }

    fn set_width(&self, width: i64) {
        let params = SetDeviceMetricsOverrideParams::new(width, 800, 1.0, width < 600);
        self.rt.block_on(self.page.execute(params)).expect("setting the viewport");
        std::thread::sleep(Duration::from_millis(200));
    }

    fn open(&self, url: &str) {
        self.rt.block_on(async {
            self.page.goto(url).await.expect("navigating");
            self.page.wait_for_navigation().await.expect("page loaded");
        });
    }

    fn eval(&self, js: &str) -> serde_json::Value {
        self.rt
            .block_on(self.page.evaluate(js))
            .expect("evaluating in the page")
            .value()
            .cloned()
            .unwrap_or(serde_json::Value::Null)
    }

    /// A full-page PNG at `width` pixels.
    fn screenshot(&self, width: i64) -> Vec<u8> {
        self.set_width(width);
        let png = self
            .rt
            .block_on(self.page.screenshot(ScreenshotParams::builder().full_page(true).build()))
            .expect("screenshot");
        self.set_width(1280);
        png
    }
}

impl Drop for Tab {
    fn drop(&mut self) {
        let _ = self.rt.block_on(self.browser.close());
        let _ = self.rt.block_on(self.browser.wait());
    }
}

/// The console's URL from the coordinator's log (it was asked for port 0): the
/// `started`-th (from 1) coordinator's.
fn console_url(fed: &Federation, started: usize) -> String {
    let until = Instant::now() + MIN;
    loop {
        let log = fed.log_text("coordinator");
        if let Some(url) = maeum_coordinator::console::urls_in_log(&log).get(started - 1) {
            return url.trim_end_matches('/').to_owned();
        }
        assert!(Instant::now() < until, "the console never said where it listens:\n{log}");
        std::thread::sleep(Duration::from_millis(100));
    }
}

fn eval(tab: &Tab, js: &str) -> serde_json::Value {
    tab.eval(js)
}

fn count(tab: &Tab, selector: &str) -> u64 {
    eval(tab, &format!("document.querySelectorAll({selector:?}).length")).as_u64().unwrap_or(0)
}

fn text_of(tab: &Tab, selector: &str) -> String {
    eval(tab, &format!("(document.querySelector({selector:?}) || {{innerText: ''}}).innerText"))
        .as_str()
        .unwrap_or("")
        .to_owned()
}

fn wait_until(what: &str, limit: Duration, mut ok: impl FnMut() -> bool) {
    let until = Instant::now() + limit;
    while !ok() {
        assert!(Instant::now() < until, "timed out waiting until {what}");
        std::thread::sleep(Duration::from_millis(250));
    }
}

fn open(tab: &Tab, url: &str) {
    tab.open(url);
}

/// Saves a full-page screenshot as NAME.png in `dirs`, at `width` pixels.
fn screenshot(tab: &Tab, name: &str, width: i64, dirs: &[PathBuf]) {
    let png = tab.screenshot(width);
    for dir in dirs {
        std::fs::create_dir_all(dir).expect("screenshot dir");
        std::fs::write(dir.join(format!("{name}.png")), &png).expect("writing the screenshot");
    }
}

/// The page fits the window's width (tables scroll inside their own box), and every
/// chart names itself and carries its numbers as a table.
fn check_layout_and_text_equivalents(tab: &Tab, page: &str) {
    for width in [1280, 390] {
        tab.set_width(width);
        let overflow = eval(tab, "document.documentElement.scrollWidth - window.innerWidth").as_f64().unwrap_or(0.0);
        assert!(overflow <= 1.0, "{page} at {width}px is {overflow}px wider than the window");
    }
    tab.set_width(1280);
    let unlabelled = eval(
        tab,
        "Array.from(document.querySelectorAll('svg[role=img]')).filter(s => { const l = document.getElementById(s.getAttribute('aria-labelledby')); \
         return !l || !l.textContent.trim() || !s.closest('figure').querySelector('table'); }).length",
    );
    assert_eq!(unlabelled, 0, "{page}: a chart without a caption or a table of its numbers");
}

#[test]
fn the_console_follows_a_real_job_and_the_reports_open_offline() {
    let mut fed = Federation::new(4);
    // site-4 refuses any job of more than 3 rounds: its reason must reach the console
    // (the other three make the cohort of three that every site's policy asks for).
    fed.set_policy("site-4", "max_rounds", "3");
    fed.start_coordinator_full(&[], &["--console", "127.0.0.1:0"]);
    let url = console_url(&fed, 1);
    // Kept after the run (the federation's temp dir is not): CI's artifacts.
    let target = std::env::var_os("CARGO_TARGET_DIR").map_or_else(|| maeum_e2e::root().join("target"), PathBuf::from);
    let mut shots = vec![target.join("console-screenshots")];
    if let Some(dir) = std::env::var_os("MAEUM_SCREENSHOTS") {
        shots.push(PathBuf::from(dir));
    }
    let tab = Tab::launch();

    // The job page, open from before the first round.
    fed.start_sites(&["site-1", "site-2", "site-3", "site-4"]);
    fed.wait_online(4);
    let rounds = 8;
    let id = fed.submit("console", rounds, 3, &format!("{SMALL_MODEL}[train]\nepochs = 1\n"));
    open(&tab, &format!("{url}/jobs/{id}"));
    eval(&tab, "window.maeumSameDocument = true");
    let first = count(&tab, "#chart-metrics .pt");
    wait_until("the round chart gained points without a reload", 3 * MIN, || count(&tab, "#chart-metrics .pt") > first);
    assert_eq!(eval(&tab, "window.maeumSameDocument === true"), true, "the page reloaded instead of updating in place");
    let status = text_of(&tab, "#status");
    assert!(status.starts_with("Live: updated"), "{status}");
    wait_until("site-4's refusal shows with its reason", MIN, || {
        let r = text_of(&tab, "#refusals");
        r.contains("site-4") && r.contains("max_rounds")
    });

    let job = fed.wait_job(&id, 5 * MIN);
    assert_eq!(job["state"], "completed", "{job:#}\n{}", fed.log_text("coordinator"));
    // Every round and the initial model: accuracy, macro-F1, crisis recall.
    wait_until("the chart shows every evaluated round", MIN, || {
        count(&tab, "#chart-metrics .pt[data-series=accuracy]") == u64::from(rounds) + 1
    });
    assert_eq!(count(&tab, "#chart-sites .bar"), u64::from(rounds));
    check_layout_and_text_equivalents(&tab, "the job page");
    screenshot(&tab, "console-job", 1280, &shots);
    screenshot(&tab, "console-job-phone", 390, &shots);

    // The release the job made, promoted as a lead would (below the default crisis gate
    // for a model this small, so with a logged override): its signature verified by the
    // console, the override shown.
    let promoted = fed.cli(&["models", "promote", "1", "--override-gate", "--reason", "console test"]);
    assert!(promoted.status.success(), "{}", String::from_utf8_lossy(&promoted.stderr));
    open(&tab, &format!("{url}/releases/1"));
    wait_until("the three sites installed the release", MIN, || count(&tab, "#installs .badge.ok") >= 3);
    assert!(text_of(&tab, "#signature").starts_with("verified"), "{}", text_of(&tab, "#signature"));
    assert!(text_of(&tab, "#logged").starts_with("logged"), "{}", text_of(&tab, "#logged"));
    assert!(count(&tab, "#confusion td") > 0, "no confusion heat map");
    check_layout_and_text_equivalents(&tab, "the release page");
    screenshot(&tab, "console-release", 1280, &shots);

    // Sites: site-4's last refusal, the release the others serve.
    open(&tab, &format!("{url}/sites"));
    assert!(count(&tab, "#sites a[href='/releases/1']") >= 3);
    let refusal = text_of(&tab, "tr[data-site=site-4] td.refusal");
    assert!(refusal.contains("max_rounds") && refusal.contains(&id), "site-4's refusal: {refusal:?}");
    check_layout_and_text_equivalents(&tab, "the sites page");
    screenshot(&tab, "console-sites", 1280, &shots);

    // The audit log, searched.
    open(&tab, &format!("{url}/audit?q=site-4&kind=job_decision"));
    let rows = count(&tab, "#entries tbody tr");
    assert!(rows >= 1, "no job_decision entry of site-4 found");
    assert_eq!(
        eval(
            &tab,
            "Array.from(document.querySelectorAll('#entries tbody tr')).every(r => r.innerText.includes('site-4') && r.innerText.includes('job_decision'))"
        ),
        true
    );
    screenshot(&tab, "console-audit", 1280, &shots);
    open(&tab, &format!("{url}/"));
    check_layout_and_text_equivalents(&tab, "the overview");
    screenshot(&tab, "console-overview", 1280, &shots);

    // The static reports, opened from disk.
    let out = fed.dir.path().join("export");
    let export = fed.cli(&["models", "export", "1", "--out", out.to_str().expect("utf-8")]);
    assert!(export.status.success(), "{}", String::from_utf8_lossy(&export.stderr));
    let report = out.join("report-v1.html");
    open(&tab, &format!("file://{}", report.display()));
    assert!(text_of(&tab, "#signature").starts_with("verified"));
    assert_eq!(count(&tab, "#chart-metrics .pt[data-series=accuracy]"), u64::from(rounds) + 1);
    assert_eq!(count(&tab, "script"), 0, "a static report runs no script");
    screenshot(&tab, "report-release", 1280, &shots);

    let audit = fed.dir.path().join("audit.json");
    let exported = fed.cli(&["audit", "export", "--out", audit.to_str().expect("utf-8")]);
    assert!(exported.status.success(), "{}", String::from_utf8_lossy(&exported.stderr));
    let html = fed.dir.path().join("audit-report.html");
    let signing = fed.coordinator_home().join("signing.pub");
    let ok = Command::new(bin("maeum-audit"))
        .arg("report")
        .arg(&audit)
        .arg("--html")
        .arg(&html)
        .arg("--trust")
        .arg(&signing)
        .arg("--release")
        .arg(&out)
        .output()
        .expect("maeum-audit");
    assert!(ok.status.success(), "{}", String::from_utf8_lossy(&ok.stderr));
    open(&tab, &format!("file://{}", html.display()));
    assert!(text_of(&tab, "#verdict").starts_with("verified"), "{}", text_of(&tab, "#verdict"));
    assert!(text_of(&tab, "#witnesses").contains("site-1"), "no cosigning site listed");
    assert!(text_of(&tab, "#installs").contains("site-1"), "the release's installs are missing");
    screenshot(&tab, "report-audit", 1280, &shots);
    // A tampered export: exit 1, and a report that says FAILED and shows nothing else.
    let bytes = std::fs::read_to_string(&audit).expect("export");
    let tampered = fed.dir.path().join("tampered.json");
    std::fs::write(&tampered, bytes.replacen("\"site-4\"", "\"site-9\"", 1)).expect("tampered");
    let bad_html = fed.dir.path().join("tampered.html");
    let bad = Command::new(bin("maeum-audit"))
        .arg("report")
        .arg(&tampered)
        .arg("--html")
        .arg(&bad_html)
        .output()
        .expect("maeum-audit");
    assert_eq!(bad.status.code(), Some(1), "{}", String::from_utf8_lossy(&bad.stderr));
    let bad_text = std::fs::read_to_string(&bad_html).expect("report of a bad log");
    assert!(bad_text.contains("FAILED: the log does not verify.") && !bad_text.contains("id=\"witnesses\""));

    for (site, refused) in [("site-1", false), ("site-4", true)] {
        let html = fed.dir.path().join(format!("{site}-report.html"));
        run_ok(
            Command::new(bin("maeum-site")).args(["report", "--home"]).arg(fed.site_home(site)).arg("--out").arg(&html),
        );
        open(&tab, &format!("file://{}", html.display()));
        let offers = text_of(&tab, "#offers");
        if refused {
            assert!(offers.contains("refused") && offers.contains("max_rounds"), "{offers}");
            assert_eq!(count(&tab, "#sent tbody tr"), 0, "site-4 sent nothing");
        } else {
            assert!(offers.contains("accepted"), "{offers}");
            let sent = count(&tab, "#sent tbody tr");
            assert!(sent >= 1, "site-1's contributions are missing");
            assert_eq!(count(&tab, "#sent .badge.ok"), sent, "every contribution travelled masked");
            screenshot(&tab, "report-site", 1280, &shots);
        }
    }
}

use rustls::pki_types::pem::PemObject as _;

fn tls_get(url_addr: &str, ca: &Path, identity: Option<(&Path, &Path)>, path: &str) -> std::io::Result<String> {
    let mut roots = rustls::RootCertStore::empty();
    for cert in rustls::pki_types::CertificateDer::pem_file_iter(ca).expect("ca.pem") {
        roots.add(cert.expect("CA certificate")).expect("root");
    }
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let builder = rustls::ClientConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .expect("versions")
        .with_root_certificates(roots);
    let config = match identity {
        Some((cert, key)) => {
            let chain = rustls::pki_types::CertificateDer::pem_file_iter(cert)
                .expect("cert")
                .map(|c| c.expect("cert"))
                .collect();
            let key = rustls::pki_types::PrivateKeyDer::from_pem_file(key).expect("key");
            builder.with_client_auth_cert(chain, key).expect("client identity")
        }
        None => builder.with_no_client_auth(),
    };
    // The coordinator's certificate names the consortium address's host (127.0.0.1).
    let name = rustls::pki_types::ServerName::try_from("127.0.0.1").expect("name");
    let mut conn = rustls::ClientConnection::new(Arc::new(config), name).expect("connection");
    let mut sock = std::net::TcpStream::connect(url_addr)?;
    sock.set_read_timeout(Some(Duration::from_secs(10)))?;
    let mut tls = rustls::Stream::new(&mut conn, &mut sock);
    tls.write_all(format!("GET {path} HTTP/1.1\r\nHost: {url_addr}\r\nConnection: close\r\n\r\n").as_bytes())?;
    let mut out = Vec::new();
    match tls.read_to_end(&mut out) {
        Ok(_) => {}
        // A peer that closes without close_notify after a full response.
        Err(e) if e.kind() == std::io::ErrorKind::UnexpectedEof && !out.is_empty() => {}
        Err(e) => return Err(e),
    }
    Ok(String::from_utf8_lossy(&out).into_owned())
}

fn http_request(addr: &str, request: &str) -> String {
    let mut s = std::net::TcpStream::connect(addr).expect("connect");
    s.set_read_timeout(Some(Duration::from_secs(10))).expect("timeout");
    s.write_all(request.as_bytes()).expect("request");
    let mut out = String::new();
    let _ = s.read_to_string(&mut out);
    out
}

#[test]
fn only_operators_reach_the_console_over_tls_and_only_loopback_hosts_over_http() {
    let mut fed = Federation::new(1);
    fed.start_coordinator_full(&[], &["--console", "127.0.0.1:0", "--console-tls"]);
    let url = console_url(&fed, 1);
    let addr = url.strip_prefix("https://").expect("an https console").to_owned();
    let home = fed.coordinator_home();
    let ca = home.join("ca.pem");

    let operator =
        tls_get(&addr, &ca, Some((&home.join("operator.pem"), &home.join("operator.key"))), "/").expect("operator");
    assert!(operator.starts_with("HTTP/1.1 200"), "{operator}");
    assert!(operator.contains("<h1>Overview</h1>") && operator.contains("content-security-policy"), "{operator}");

    let site = fed.site_home("site-1");
    let refused = tls_get(&addr, &ca, Some((&site.join("site.pem"), &site.join("site.key"))), "/").expect("site");
    assert!(refused.starts_with("HTTP/1.1 403"), "{refused}");
    assert!(refused.contains("needs an operator certificate") && refused.contains("site/site-1"), "{refused}");
    assert!(!refused.contains("Overview"));

    match tls_get(&addr, &ca, None, "/") {
        Err(_) => {}
        Ok(reply) => assert!(!reply.contains("Overview"), "a client without a certificate got a page:\n{reply}"),
    }
    fed.kill_coordinator();

    // Plain HTTP on loopback: GET only, and only for a Host that names loopback.
    fed.start_coordinator_full(&[], &["--console", "127.0.0.1:0"]);
    let url = console_url(&fed, 2);
    let addr = url.strip_prefix("http://").expect("an http console").to_owned();
    let ok = http_request(&addr, &format!("GET /sites HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\n\r\n"));
    assert!(ok.starts_with("HTTP/1.1 200") && ok.contains("site-1"), "{ok}");
    let rebound = http_request(&addr, "GET / HTTP/1.1\r\nHost: attacker.example\r\nConnection: close\r\n\r\n");
    assert!(rebound.starts_with("HTTP/1.1 421"), "{rebound}");
    let post = http_request(
        &addr,
        &format!("POST /jobs HTTP/1.1\r\nHost: {addr}\r\nContent-Length: 0\r\nConnection: close\r\n\r\n"),
    );
    assert!(post.starts_with("HTTP/1.1 405"), "{post}");
    let missing = http_request(&addr, &format!("GET /jobs/nope HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\n\r\n"));
    assert!(missing.starts_with("HTTP/1.1 404"), "{missing}");
}
