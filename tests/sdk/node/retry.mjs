// Opens northstar's dashboard on the customers view with a key, presses "Retry dead letters",
// and prints what the page showed before and after as one JSON object (tests/dashboard.rs
// checks it).
//
// Usage: node retry.mjs BASE_URL KEY
import puppeteer from "puppeteer-core";

const [base, key] = process.argv.slice(2);
const browser = await puppeteer.launch({
  executablePath: process.env.CHROMIUM || "/usr/bin/chromium",
  headless: true,
  args: ["--no-sandbox", "--disable-gpu"],
});
const seen = { errors: [] };
try {
  const page = await browser.newPage();
  await page.setViewport({ width: 1280, height: 800 });
  page.on("console", (message) => {
    if (message.type() === "error") seen.errors.push(message.text());
  });
  page.on("pageerror", (error) => seen.errors.push(error.message));
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
