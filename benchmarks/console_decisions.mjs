// Every decision of an evolution run, as the operator console shows it in Debian's Chromium (playwright-core):
// each iteration's compare view must show, per stage, the tasks x seeds, the mean paired difference with its
// bootstrap interval and the margin (the strings benchmarks/evolution.py expects from the API's numbers), and
// its candidate page the per-task differences. Screenshots of the timeline and of each compare view go to <out dir>.
// Usage: node console_decisions.mjs <console url> <expectations.json> <out dir>
//   expectations.json: [{"id": "...", "round": 1, "texts": ["24 tasks × 3 seeds", "+0.042 [-0.01, +0.1]", ...]}]
import { chromium } from "playwright-core";
import { mkdirSync, mkdtempSync, readFileSync, rmSync } from "node:fs";
import { tmpdir } from "node:os";
import { join } from "node:path";

const [url, expectationsFile, outDir] = process.argv.slice(2);
const expectations = JSON.parse(readFileSync(expectationsFile, "utf8"));
mkdirSync(outDir, { recursive: true });
const profile = mkdtempSync(join(tmpdir(), "forgerl-console-"));
const browser = await chromium.launchPersistentContext(profile, {
  executablePath: process.env.CHROMIUM || "/usr/bin/chromium",
  headless: true,
  viewport: { width: 1440, height: 900 },
  args: ["--headless", "--no-sandbox", "--disable-gpu", "--no-first-run", "--disable-background-networking"],
});
const results = [];
const check = (name, ok, detail = "") => results.push({ name, ok: Boolean(ok), detail });
try {
  const page = await browser.newPage();
  await page.goto(`${url}#/iterations`);
  await page.waitForSelector(".timeline .tl-item", { timeout: 15000 });
  await page.screenshot({ path: `${outDir}/iterations.png`, fullPage: true });
  check("the timeline lists every round", (await page.locator(".tl-item").count()) === expectations.length);
  for (const it of expectations) {
    if (!it.texts.length) continue; // refused before evaluation: nothing to compare
    await page.goto(`${url}#/compare/${it.id}`);
    await page.waitForSelector("svg[aria-label='confidence intervals']", { timeout: 15000 });
    const text = await page.textContent("#main");
    const missing = it.texts.filter((t) => !text.includes(t));
    check(`round ${it.round}: compare view shows every stage's statistics`, missing.length === 0, missing.join(" | "));
    await page.screenshot({ path: `${outDir}/compare-round-${String(it.round).padStart(2, "0")}.png`, fullPage: true });
    await page.goto(`${url}#/iteration/${it.id}`);
    await page.waitForSelector("#iteration-state", { timeout: 15000 });
    check(`round ${it.round}: candidate page lists per-task differences`, (await page.locator("text=Per-task results").count()) === 1);
  }
} catch (err) {
  check("page flow", false, String(err));
} finally {
  await browser.close();
  rmSync(profile, { recursive: true, force: true });
}
console.log(JSON.stringify(results));
process.exit(results.every((r) => r.ok) ? 0 : 1);
