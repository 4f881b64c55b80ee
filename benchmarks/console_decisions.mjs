// Every decision of an evolution run, as the operator console shows it in Debian's Chromium (playwright-core):
// each iteration's compare view must show, per stage, the tasks x seeds, the mean paired difference with its
// bootstrap interval and the margin (the strings benchmarks/evolution.py expects from the API's numbers), and
// its candidate page the per-task differences. Screenshots of the timeline and of each compare view go to <out dir>.
// Usage: node console_decisions.mjs <console url> <expectations.json> <out dir>
//   expectations.json: [{"id": "...", "round": 1, "texts": ["24 tasks × 3 seeds", "+0.042 [-0.01, +0.1]", ...]}]
import { readFileSync } from "node:fs";
import { withChromium } from "../tests/browser/chromium.mjs";

const [url, expectationsFile, outDir] = process.argv.slice(2);
const expectations = JSON.parse(readFileSync(expectationsFile, "utf8"));
await withChromium(outDir, async (page, check) => {
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
});
