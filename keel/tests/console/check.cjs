// Drives the console in headless Chromium (Debian's, through playwright-core) against a running
// platform: sign in, see the projections, watch posts filtered to PostPublished, produce events
// through the API, and check what the page shows, charts of commit rates and lag included. Exits
// non-zero on the first failed check.
//
// Environment: PLAYWRIGHT_CORE (the package's directory), GATEWAY (http://…), EMAIL, PASSWORD
// (an operator's account), SCREENSHOT (a path for the final page).
"use strict";

const { chromium } = require(process.env.PLAYWRIGHT_CORE);

const gateway = process.env.GATEWAY;
const timeout = 20000;

async function api(method, path, token, body) {
  const response = await fetch(`${gateway}${path}`, {
    method,
    headers: { "content-type": "application/json", ...(token ? { authorization: `Bearer ${token}` } : {}) },
    body: body === undefined ? undefined : JSON.stringify(body),
  });
  const json = await response.json();
  if (!response.ok) throw new Error(`${method} ${path}: ${response.status} ${JSON.stringify(json)}`);
  return json;
}

function check(condition, message) {
  if (!condition) throw new Error(`check failed: ${message}`);
  console.log(`ok: ${message}`);
}

async function main() {
  const browser = await chromium.launch({
    executablePath: "/usr/bin/chromium",
    args: ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
      "--disable-background-networking", "--disable-component-update", "--disable-sync"],
  });
  const page = await browser.newPage();
  const problems = [];
  page.on("pageerror", (error) => problems.push(`page error: ${error.message}`));
  page.on("console", (message) => { if (message.type() === "error") problems.push(`console: ${message.text()}`); });
  try {
    await page.goto(`${gateway}/console`);
    check((await page.title()) === "Keel console", "the page loads");

    await page.fill("#email", process.env.EMAIL);
    await page.fill("#password", process.env.PASSWORD);
    await page.click("#login button");
    await page.waitForSelector("#who:not([hidden])", { timeout });
    check(await page.isHidden("#login"), "signing in works and hides the form");

    const blog = page.locator('tr[data-projection="blog"]');
    await blog.waitFor({ timeout });
    const lag = await blog.locator("td.lag").textContent();
    check(/^\d+$/.test(lag), `the projections' status shows the blog projection's lag (${lag})`);
    check((await page.locator("#projection-rows tr[data-projection]").count()) >= 5, "every projection is listed");

    // Watch publications only.
    await page.selectOption("#alias", "posts");
    await page.fill("#types", "PostPublished");
    await page.click("#connect");
    await page.waitForFunction(() => document.getElementById("state").textContent === "live", null, { timeout });
    check(true, "the stream is live");

    const tokens = await api("POST", "/v1/auth/login", null, { email: process.env.EMAIL, password: process.env.PASSWORD });
    const draft = await api("POST", "/v1/posts", tokens.access_token, { title: "Seen in the console", body: "Hello." });
    await api("POST", `/v1/posts/${draft.id}/publish`, tokens.access_token, {});
    const row = page.locator("#events tbody tr", { hasText: draft.id });
    await row.first().waitFor({ timeout });
    check((await row.first().getAttribute("data-type")) === "PostPublished", "the event produced during the test shows up");
    check((await row.count()) === 1, "the filter keeps the post's PostDrafted out");
    const types = await page.$$eval("#events tbody tr", (rows) => rows.map((r) => r.dataset.type));
    check(types.every((type) => type === "PostPublished"), `every row is a PostPublished (${types.length} rows)`);

    // The charts: the posts' topic shows a commit rate above zero, and every projection a lag line.
    await page.waitForFunction(() => {
      const line = document.querySelector('#chart-rates polyline[data-series="blog.posts"]');
      return line !== null && Number(line.dataset.max) > 0;
    }, null, { timeout });
    check(true, "the commit-rate chart shows the posts written during the test");
    await page.waitForFunction(() => [...document.querySelectorAll("#chart-lag polyline")]
      .filter((line) => Number(line.dataset.points) >= 2).length >= 5, null, { timeout });
    const lagLines = await page.$$eval("#chart-lag polyline", (lines) => lines.map((line) => line.dataset.series));
    check(lagLines.includes("blog") && lagLines.includes("users"), `a lag line per projection (${lagLines.join(", ")})`);
    const legend = await page.textContent("#chart-rates-legend");
    check(legend.includes("blog.posts"), `the legend names the topics (${legend})`);

    // Without the filter, from the beginning, the draft shows too.
    await page.fill("#types", "");
    await page.selectOption("#from", "earliest");
    await page.click("#connect");
    const drafted = page.locator('#events tbody tr[data-type="PostDrafted"]', { hasText: draft.id });
    await drafted.waitFor({ timeout });
    check(true, "clearing the filter shows the post's PostDrafted");

    await page.click("#disconnect");
    check((await page.textContent("#state")) === "idle", "the stream stops");
    check(problems.length === 0, `no script errors (${problems.join("; ")})`);
  } finally {
    if (process.env.SCREENSHOT) await page.screenshot({ path: process.env.SCREENSHOT, fullPage: true }).catch(() => {});
    await browser.close();
  }
}

main().catch((error) => {
  console.error(error.stack || String(error));
  process.exit(1);
});
