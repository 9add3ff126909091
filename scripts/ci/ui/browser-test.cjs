// Browser test of the web UI, driven by playwright-core with Debian's chromium.
//
//   node browser-test.cjs BASE_URL QUEUE OUT_DIR
//
// Submits a job whose test command waits for a go-file, then echoes a unique marker;
// opens the job's page while the job runs; checks the marker is not there yet; creates
// the go-file; waits for the marker to appear in the page (no reload), then for the
// state to turn `complete` (no reload). Saves screenshots of the overview, the job, the
// queue and the list pages under OUT_DIR. Every page must answer with a
// Content-Security-Policy, and the browser must report no violation of it on any page
// (an inline script injected on purpose must be refused, which shows the check works);
// the documentation site's pages too when the server serves it (scripts/docs build).
// Last, the job page's cancel button cancels a second job. Prints "ok - ..." lines;
// exits non-zero on a failure.
"use strict";
const fs = require("fs");
const path = require("path");
const os = require("os");

const [base, queue, outDir] = process.argv.slice(2);
if (!base || !queue || !outDir) {
  console.error("usage: node browser-test.cjs BASE_URL QUEUE OUT_DIR");
  process.exit(2);
}
const pwPath = process.env.PLAYWRIGHT_CORE || "playwright-core";
const { chromium } = require(pwPath);
const chromiumPath = process.env.CHROMIUM || "/usr/bin/chromium";

function ok(msg) { console.log("ok - " + msg); }

// Content-Security-Policy violations the browser reports on the console, per page.
const cspViolations = [];
function watchCsp(page, what) {
  page.on("console", (m) => {
    if (/Content[ -]Security[ -]Policy/i.test(m.text())) cspViolations.push(`${what()}: ${m.text()}`);
  });
  return page;
}
function assertNoCsp(what) {
  if (cspViolations.length) throw new Error(`${what}: Content-Security-Policy violations: ${cspViolations.join(" | ")}`);
}
function assertCspHeader(r, what) {
  const csp = r.headers()["content-security-policy"] || "";
  if (!/script-src/.test(csp)) throw new Error(`${what}: no Content-Security-Policy header (${csp})`);
  if (/script-src[^;]*unsafe-inline/.test(csp)) throw new Error(`${what}: script-src allows inline scripts: ${csp}`);
  if (r.headers()["x-content-type-options"] !== "nosniff") throw new Error(`${what}: no X-Content-Type-Options: nosniff`);
}

async function api(method, p, body) {
  const r = await fetch(base + p, {
    method,
    headers: body ? { "content-type": "application/json" } : {},
    body: body ? JSON.stringify(body) : undefined,
  });
  const text = await r.text();
  if (!r.ok) throw new Error(`${method} ${p} -> ${r.status}: ${text}`);
  return text ? JSON.parse(text) : null;
}

async function until(what, secs, f) {
  const end = Date.now() + secs * 1000;
  for (;;) {
    const v = await f();
    if (v) return v;
    if (Date.now() > end) throw new Error(`timed out after ${secs} s waiting for ${what}`);
    await new Promise((r) => setTimeout(r, 250));
  }
}

// Basic accessibility checks: a language, one h1, a main landmark, a name for every
// form control and link, a caption or label for every table.
async function checkAccessible(page, what) {
  const problems = await page.evaluate(() => {
    const out = [];
    if (!document.documentElement.lang) out.push("no lang on <html>");
    if (document.querySelectorAll("h1").length !== 1) out.push("not exactly one h1");
    if (!document.querySelector("main")) out.push("no <main>");
    for (const el of document.querySelectorAll("input:not([type=hidden]), select, textarea, button")) {
      const named = (el.labels && el.labels.length) || el.getAttribute("aria-label") ||
        (el.tagName === "BUTTON" && el.textContent.trim());
      if (!named) out.push(`unnamed ${el.tagName.toLowerCase()} ${el.name || ""}`);
    }
    for (const a of document.querySelectorAll("a")) {
      if (!a.textContent.trim() && !a.getAttribute("aria-label")) out.push(`empty link ${a.href}`);
    }
    for (const t of document.querySelectorAll("table")) {
      if (!t.querySelector("caption") && !t.getAttribute("aria-label")) out.push("table without caption");
    }
    return out;
  });
  if (problems.length) throw new Error(`${what}: ${problems.join("; ")}`);
}

(async () => {
  fs.mkdirSync(outDir, { recursive: true });
  const work = fs.mkdtempSync(path.join(os.tmpdir(), "tf-ui-test-"));
  const go = path.join(work, "go");
  const marker = `ui-marker-${process.pid}-${Date.now()}`;
  const cmds = [
    "echo 'before the marker: waiting for the browser'",
    // Bounded: the job ends by itself after 120 s if the test dies.
    `for i in $(seq 1 600); do [ -e '${go}' ] && break; sleep 0.2; done`,
    `echo '${marker}'`,
    "sleep 1",
  ].join("\n");
  const { job_id: id } = await api("POST", "/v1/job", {
    job_queue: queue,
    tags: ["ui-test"],
    test_data: { test_cmds: cmds },
  });
  ok(`submitted job ${id}`);
  await until("the job to reach its test phase", 90, async () => {
    const r = await api("GET", `/v1/result/${id}`);
    return r && r.job_state === "test";
  });
  ok("the job is running its test phase");

  const browser = await chromium.launch({
    executablePath: chromiumPath,
    headless: true,
    args: ["--no-sandbox", "--disable-dev-shm-usage"],
  });
  try {
    const context = await browser.newContext({
      viewport: { width: 1280, height: 900 },
      permissions: ["clipboard-read", "clipboard-write"],
    });
    const page = watchCsp(await context.newPage(), () => page.url());
    const errors = [];
    page.on("pageerror", (e) => errors.push(String(e)));
    let loads = 0;
    page.on("load", () => { loads += 1; });

    assertCspHeader(await page.goto(`${base}/jobs/${id}`, { waitUntil: "load" }), "job page");
    const stateNow = await page.textContent("#job-state");
    if (stateNow.trim() === "complete") throw new Error("the job completed before the page loaded");
    await page.waitForSelector('.log-section[data-log-type="output"] .live-status:text("live")', { timeout: 10000 });
    ok(`job page loaded while the job is '${stateNow.trim()}', live log connected`);
    const before = await page.textContent('.log-section[data-log-type="output"] pre');
    if (before.includes(marker)) throw new Error("the marker is in the page before the job printed it");
    await page.waitForFunction(
      () => document.querySelector('.log-section[data-log-type="output"] pre').textContent.includes("before the marker"),
      null, { timeout: 15000 });
    ok("output printed before the page loaded is shown");
    // Marks this document: a reload would lose it.
    await page.evaluate(() => { window.__sameDocument = true; });

    fs.writeFileSync(go, "");
    await page.waitForFunction(
      (m) => document.querySelector('.log-section[data-log-type="output"] pre').textContent.includes(m),
      marker, { timeout: 30000 });
    ok("the line the job printed after the page loaded appeared without a reload");

    await page.waitForFunction(
      () => document.getElementById("job-state").textContent.trim() === "complete",
      null, { timeout: 60000 });
    const same = await page.evaluate(() => window.__sameDocument === true);
    if (!same || loads !== 1) throw new Error(`the page was reloaded (loads: ${loads})`);
    ok("the state turned 'complete' without a reload");
    if (await page.$("[data-cancel-form]")) throw new Error("the cancel button is still shown after completion");
    ok("the cancel button went away");
    await checkAccessible(page, "job page");
    if (errors.length) throw new Error("script errors on the job page: " + errors.join("; "));
    ok("no script errors");
    assertNoCsp("job page");
    ok("no Content-Security-Policy violation on the job page (live log, state poll, refresh)");
    // The policy is enforced: an inline script added now is refused and reported.
    await page.evaluate(() => {
      const s = document.createElement("script");
      s.textContent = "window.__inlineRan = true;";
      document.body.appendChild(s);
    });
    await until("the refused inline script to be reported", 5, async () => cspViolations.length > 0);
    if (await page.evaluate(() => window.__inlineRan === true)) throw new Error("an inline script ran: no CSP");
    cspViolations.length = 0;
    ok("an injected inline script is refused and reported (the CSP check works)");
    await page.screenshot({ path: path.join(outDir, "job.png"), fullPage: true });

    // The YAML definition can be resubmitted: it parses and names the queue.
    const yaml = await page.textContent("#job-yaml");
    if (!yaml.includes(`job_queue: ${queue}`) || yaml.includes("job_id")) {
      throw new Error("the definition YAML is not resubmittable: " + yaml);
    }
    ok("the definition is shown as YAML without the job id");
    await page.click("[data-copy]");
    await page.waitForFunction(() => document.querySelector("[data-copy]").textContent === "Copied", null, { timeout: 5000 });
    const copied = await page.evaluate(() => navigator.clipboard.readText());
    if (copied !== yaml) throw new Error("the copy button copied something else: " + copied);
    ok("the copy button puts the YAML on the clipboard");

    const agents = await api("GET", "/v1/agents/data");
    for (const [name, p] of [
      ["overview", "/"],
      ["agent", `/agents/${encodeURIComponent(agents[0].name)}`],
      ["queue", `/queues/${encodeURIComponent(queue)}`],
      ["jobs", "/jobs"],
      ["agents", "/agents"],
      ["queues", "/queues"],
    ]) {
      const r = await page.goto(base + p, { waitUntil: "load" });
      if (r.status() !== 200) throw new Error(`${p} answered ${r.status()}`);
      assertCspHeader(r, p);
      await checkAccessible(page, p);
      await page.screenshot({ path: path.join(outDir, `${name}.png`), fullPage: true });
      assertNoCsp(p);
      ok(`${p} rendered, basic accessibility checks pass, no CSP violation; screenshot ${name}.png`);
    }
    for (const [p, status] of [["/jobs/00000000-0000-4000-8000-000000000000", 404], ["/jobs?state=bogus", 400]]) {
      const r = await page.goto(base + p, { waitUntil: "load" });
      if (r.status() !== status) throw new Error(`${p} answered ${r.status()}, expected ${status}`);
      assertCspHeader(r, p);
      await checkAccessible(page, p);
      assertNoCsp(p);
      ok(`the error page ${p} (${status}) has the policy, no CSP violation`);
    }
    const queuePage = await (await page.goto(`${base}/queues/${encodeURIComponent(queue)}`)).text();
    if (!queuePage.includes(id)) throw new Error("the queue page does not list the job");
    ok("the queue page lists the job");

    // Without JavaScript: the page still shows the output (as rendered) and the state.
    const nojs = await browser.newContext({ javaScriptEnabled: false });
    const np = watchCsp(await nojs.newPage(), () => np.url());
    await np.goto(`${base}/jobs/${id}`, { waitUntil: "load" });
    const staticLog = await np.textContent('.log-section[data-log-type="output"] pre');
    if (!staticLog.includes(marker)) throw new Error("without JavaScript the output is not shown");
    if ((await np.textContent("#job-state")).trim() !== "complete") throw new Error("without JavaScript the state is wrong");
    ok("without JavaScript the job page shows the output and the state");

    // The dark colour scheme.
    const dark = await browser.newContext({ colorScheme: "dark", viewport: { width: 1280, height: 900 } });
    const dp = watchCsp(await dark.newPage(), () => dp.url());
    await dp.goto(`${base}/jobs/${id}`, { waitUntil: "load" });
    await dp.screenshot({ path: path.join(outDir, "job-dark.png"), fullPage: false });
    ok("screenshot job-dark.png");

    // A phone.
    const phone = await browser.newContext({ viewport: { width: 390, height: 844 }, deviceScaleFactor: 2, isMobile: true });
    const pp = watchCsp(await phone.newPage(), () => pp.url());
    await pp.goto(`${base}/jobs/${id}`, { waitUntil: "load" });
    const overflow = await pp.evaluate(() => document.documentElement.scrollWidth - window.innerWidth);
    if (overflow > 1) throw new Error(`the job page is ${overflow}px wider than a phone screen`);
    await pp.screenshot({ path: path.join(outDir, "job-phone.png"), fullPage: false });
    ok("the job page fits a phone screen; screenshot job-phone.png");
    assertNoCsp("job page (no JavaScript, dark, phone)");

    // The documentation site, when this server serves it: mdBook's own inline scripts
    // (allowed by hash) run, nothing is refused.
    const docs = await fetch(`${base}/docs/`);
    if (docs.status === 200) {
      for (const p of ["/docs/", "/docs/reference/job.html", "/docs/how-to/auth.html"]) {
        const r = await page.goto(base + p, { waitUntil: "load" });
        if (r.status() !== 200) throw new Error(`${p} answered ${r.status()}`);
        assertCspHeader(r, p);
        // mdBook's inline theme script adds the class "js"; its sidebar script fills the
        // table of contents.
        await page.waitForFunction(() => document.documentElement.classList.contains("js") &&
          document.querySelectorAll("#mdbook-sidebar a, .sidebar a").length > 0, null, { timeout: 10000 });
        await page.waitForTimeout(300);
        if (errors.length) throw new Error(`script errors on ${p}: ` + errors.join("; "));
        assertNoCsp(p);
        ok(`${p}: mdBook's scripts ran, no CSP violation`);
      }
    } else {
      ok(`# skip: the documentation site is not built (GET /docs/ -> ${docs.status}; scripts/docs build)`);
    }

    // The cancel button (a form POST: the Referrer-Policy must leave the Origin header
    // the server checks): cancels a second job, back on its page.
    const { job_id: second } = await api("POST", "/v1/job", {
      job_queue: queue,
      tags: ["ui-test"],
      test_data: { test_cmds: `for i in $(seq 1 600); do [ -e '${go}-2' ] && break; sleep 0.2; done` },
    });
    await page.goto(`${base}/jobs/${second}`, { waitUntil: "load" });
    page.once("dialog", (d) => d.accept());
    await Promise.all([
      page.waitForEvent("load"),
      page.click("[data-cancel-form] button"),
    ]);
    await until("the second job to be cancelled", 15, async () => (await api("GET", `/v1/result/${second}`)).job_state === "cancelled");
    if (page.url() !== `${base}/jobs/${second}`) throw new Error(`after cancel the browser is on ${page.url()}`);
    await page.waitForSelector("#job-state.state-cancelled", { timeout: 10000 });
    fs.writeFileSync(`${go}-2`, "");
    assertNoCsp("cancel");
    ok("the cancel button cancelled a job; its page shows 'cancelled'");
  } finally {
    await browser.close();
    fs.rmSync(work, { recursive: true, force: true });
  }
})().catch((e) => {
  console.log("not ok - " + (e && e.stack ? e.stack : e));
  process.exit(1);
});
