// Drives the operator console in Debian's Chromium (playwright-core): every page renders from the live
// service, and an approval clicked in the page promotes the iteration. Screenshots go to the artefacts dir.
// Usage: node console_pages.mjs <console url> <operator token> <awaiting iteration id> <promoted iteration id> <out dir>
import { withChromium } from "./chromium.mjs";

const [url, token, awaitingId, promotedId, outDir] = process.argv.slice(2);
await withChromium(outDir, async (page, check) => {
  const requests = [];
  page.on("request", (r) => requests.push(r.url()));
  const errors = [];
  page.on("pageerror", (e) => errors.push(String(e)));

  const visit = async (hash, waitFor, shot) => {
    await page.goto(`${url}${hash}`);
    await page.waitForSelector(waitFor, { timeout: 15000 });
    await page.waitForTimeout(150); // the header's status arrives after the view
    await page.screenshot({ path: `${outDir}/${shot}.png`, fullPage: true });
  };

  await visit("#/", "text=Recent iterations", "overview");
  check("overview shows the budget", await page.isVisible("text=Evaluation episodes"));
  await visit("#/iterations", ".timeline .tl-item", "iterations");
  check("timeline lists six iterations", (await page.locator(".tl-item").count()) === 6);
  await visit("#/lineage", ".tree .node", "lineage");
  check("lineage marks the incumbent", (await page.locator(".node.incumbent").count()) === 1);
  await visit(`#/compare/${promotedId}`, "svg[aria-label='confidence intervals']", "compare");
  check("compare draws one interval per stage", (await page.locator("svg[aria-label='confidence intervals'] circle").count()) === 3);
  await visit("#/anomalies", "text=non finite", "anomalies");
  // A change made elsewhere (here: a dismissal through the API, not through the page) reaches the open page
  // by server-sent events: the row turns "dismissed" without a reload.
  await page.evaluate(async (token) => {
    const [first] = await (await fetch("/api/v1/anomalies")).json();
    await fetch(`/api/v1/anomalies/${first.id}/decide`, {
      method: "POST",
      headers: { "Content-Type": "application/json", Authorization: `Bearer ${token}` },
      body: JSON.stringify({ operator: "api-operator", approve: false }),
    });
  }, token);
  await page.waitForSelector(".pill.dismissed", { timeout: 15000 });
  check("a decision made elsewhere appears live (SSE)", await page.isVisible("text=api-operator"));
  await visit("#/audit", "#chain", "audit");
  check("audit chain verified", (await page.textContent("#chain")).includes("verified"));
  await visit("#/budget", "text=Budget & controls", "budget");
  await visit("#/memory", "pre.md", "memory");
  check("memory holds round notes", (await page.textContent("pre.md")).includes("## Round 1"));

  await visit(`#/iteration/${awaitingId}`, "#approval-box", "candidate-awaiting");
  check("candidate page shows its diff", await page.isVisible(".diff .add"));
  check("state is awaiting approval", (await page.textContent("#iteration-state")).includes("awaiting approval"));
  await page.fill("#operator-name", "browser-operator");
  await page.fill("#operator-token", token);
  await page.fill("#approval-note", "approved from the console");
  await page.click("button[data-action=approve]");
  await page.waitForFunction(() => document.querySelector("#iteration-state")?.textContent.includes("promoted"), null, { timeout: 15000 });
  await page.screenshot({ path: `${outDir}/candidate-approved.png`, fullPage: true });
  check("approval in the page promoted the iteration", (await page.textContent("#iteration-state")).includes("promoted"));

  const foreign = requests.filter((r) => !r.startsWith(url.replace(/\/$/, "")));
  check("no request leaves the console's origin", foreign.length === 0, foreign.join(" "));
  check("no script errors", errors.length === 0, errors.join(" | "));
});
