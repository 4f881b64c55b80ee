// Debian's Chromium through playwright-core, for the console's browser checks: a fresh profile each run, the
// checks collected as {name, ok, detail} and printed as one JSON line last; the exit status says whether all held.
import { chromium } from "playwright-core";
import { mkdirSync, mkdtempSync, rmSync } from "node:fs";
import { tmpdir } from "node:os";
import { join } from "node:path";

export async function withChromium(outDir, body) {
  mkdirSync(outDir, { recursive: true });
  const profile = mkdtempSync(join(tmpdir(), "forgerl-console-")); // a fresh --user-data-dir each run
  const browser = await chromium.launchPersistentContext(profile, {
    executablePath: process.env.CHROMIUM || "/usr/bin/chromium",
    headless: true,
    viewport: { width: 1440, height: 900 },
    args: [
      "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
      "--disable-background-networking", "--disable-component-update", "--disable-sync",
    ],
  });
  const results = [];
  const check = (name, ok, detail = "") => results.push({ name, ok: Boolean(ok), detail });
  try {
    await body(await browser.newPage(), check);
  } catch (err) {
    check("page flow", false, String(err));
  } finally {
    await browser.close();
    rmSync(profile, { recursive: true, force: true });
  }
  console.log(JSON.stringify(results));
  process.exit(results.every((r) => r.ok) ? 0 : 1);
}
