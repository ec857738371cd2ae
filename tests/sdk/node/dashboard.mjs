// Drives northstar's dashboard in Debian's Chromium with puppeteer-core: signs in with a key,
// opens the activation view, presses "Recompute now", and prints what the page showed as one
// JSON object (tests/dashboard.rs checks it).
//
// Usage: node dashboard.mjs BASE_URL KEY [SCREENSHOT.png]
import { openPage } from "./page.mjs";

const [base, key, screenshot] = process.argv.slice(2);
const seen = { errors: [] };
const { browser, page } = await openPage(seen);
try {
  await page.goto(`${base}/dashboard`);
  // Signed out: the form asks for the key once.
  await page.waitForSelector("#login:not([hidden])");
  await page.type("#key", key);
  await page.click("#login-form button");
  await page.waitForSelector('body[data-loaded="overview"]');
  seen.stored = await page.evaluate(() => sessionStorage.getItem("northstar-key") !== null);

  await page.click('nav a[data-view="activation"]');
  await page.waitForSelector('body[data-loaded="activation"]');
  const versions = () => page.$$eval("#versions tbody tr", (rows) => rows.length);
  seen.versions_before = await versions();
  await page.click("#recompute");
  await page.waitForFunction(
    () => !["", "computing…"].includes(document.getElementById("recompute-result").textContent),
  );
  seen.result = await page.$eval("#recompute-result", (e) => e.textContent);
  seen.versions_after = await versions();
  seen.threshold = await page.$eval("#threshold", (e) => e.textContent);
  seen.picture = await page.$eval("#picture", (e) => e.src.startsWith("blob:") && e.naturalWidth > 0);
  seen.bars = await page.$eval("#northstar-chart", (e) => Number(e.dataset.bars || 0));
  seen.still_signed_in = await page.evaluate(() => sessionStorage.getItem("northstar-key") !== null);
  if (screenshot) await page.screenshot({ path: screenshot, fullPage: true });
} finally {
  await browser.close();
}
console.log(JSON.stringify(seen));
