// What the dashboard scripts share: Debian's Chromium through puppeteer-core, one page at
// 1280×800 whose console errors and script errors are collected in `seen.errors`.
import puppeteer from "puppeteer-core";

// Launches the browser and opens a page; the caller closes `browser`.
export async function openPage(seen) {
  const browser = await puppeteer.launch({
    executablePath: process.env.CHROMIUM || "/usr/bin/chromium",
    headless: true,
    args: ["--no-sandbox", "--disable-gpu"],
  });
  const page = await browser.newPage();
  await page.setViewport({ width: 1280, height: 800 });
  page.on("console", (message) => {
    if (message.type() === "error") seen.errors.push(message.text());
  });
  page.on("pageerror", (error) => seen.errors.push(error.message));
  return { browser, page };
}
