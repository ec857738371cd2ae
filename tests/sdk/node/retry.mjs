// Opens northstar's dashboard on the customers view with a key, presses "Retry dead letters",
// and prints what the page showed before and after as one JSON object (tests/dashboard.rs
// checks it).
//
// Usage: node retry.mjs BASE_URL KEY
import { openPage } from "./page.mjs";

const [base, key] = process.argv.slice(2);
const seen = { errors: [] };
const { browser, page } = await openPage(seen);
try {
  await page.goto(`${base}/dashboard#key=${encodeURIComponent(key)}&view=customers`);
  await page.waitForSelector('body[data-loaded="customers"]');
  const dead = () => page.$$eval("#billing-dead tbody tr", (rows) => rows.length);
  seen.dead_before = await dead();
  await page.click("#billing-retry");
  await page.waitForFunction(
    () => !["", "retrying…"].includes(document.getElementById("billing-retried").textContent),
  );
  seen.retried = await page.$eval("#billing-retried", (e) => e.textContent);
  seen.billing = await page.$eval("#billing", (e) => e.textContent);
} finally {
  await browser.close();
}
console.log(JSON.stringify(seen));
