// Drives the chatstream web UI in headless Chromium against a --mock server:
// send a message and watch it stream, stop it, regenerate, see a refusal shown as a notice,
// clear, and save a screenshot. Usage: node ui.mjs URL SCREENSHOT.png
import { chromium } from "playwright-core";

const [url, shot] = process.argv.slice(2);
const fail = (msg) => { console.error("webui test failed: " + msg); process.exit(1); };

const browser = await chromium.launch({
  executablePath: process.env.CHROMIUM || "/usr/bin/chromium",
  args: ["--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
    "--disable-background-networking", "--disable-component-update", "--disable-sync"],
});
try {
  const page = await browser.newPage();
  page.setDefaultTimeout(15000);
  await page.goto(url);
  if ((await page.title()) !== "Test UI") fail("title is " + (await page.title()));
  await page.waitForSelector("text=Welcome, tester");

  // 1. send: the answer streams (several different partial texts), Japanese and emoji intact
  const message = "こんにちは 🌊 stream please";
  await page.fill("#input", message);
  await page.click("#send");
  const user = await page.textContent(".user");
  if (user !== message) fail("user bubble shows " + JSON.stringify(user));
  const seen = new Set();
  for (let i = 0; i < 40 && seen.size < 3; i++) {
    const t = await page.textContent(".assistant");
    if (t && t !== "…") seen.add(t);
    await page.waitForTimeout(50);
  }
  if (seen.size < 3) fail("answer did not stream: " + JSON.stringify([...seen]));

  // 2. stop: the fetch is aborted, the partial answer stays, a notice says so
  await page.click("#stop");
  await page.waitForSelector(".notice:has-text('Stopped.')");
  const partial = await page.textContent(".assistant");
  if (!partial || partial.length < 3) fail("partial answer lost: " + JSON.stringify(partial));
  await page.waitForFunction(() => !document.getElementById("send").disabled);
  // the server notices the abort at its next write; wait until the worker is free again
  for (let i = 0; ; i++) {
    const load = await page.evaluate(() => fetch("get_load").then((r) => r.json()));
    if (load.chatstream_workers[0].processing === 0) break;
    if (i > 50) fail("the aborted answer still holds the worker");
    await page.waitForTimeout(20);
  }

  // 3. regenerate: the last answer is replaced by a new, complete one
  await page.click("#regenerate");
  await page.waitForFunction(() => document.getElementById("send").disabled === false
    && document.querySelector(".assistant").textContent.split(" ").length >= 12, null, { timeout: 20000 });
  const regenerated = await page.textContent(".assistant");
  if (!regenerated.startsWith("The quick brown fox")) fail("regenerated answer: " + JSON.stringify(regenerated));

  // 4. a busy server is shown as a notice, not as answer text
  await page.evaluate(() => { window.__hog = fetch("chat_stream", { method: "POST", credentials: "omit", body: JSON.stringify({ user_input: "hog" }) }); });
  await page.waitForTimeout(150);
  await page.fill("#input", "are you busy?");
  await page.click("#send");
  await page.waitForSelector(".notice:has-text('busy')");
  if ((await page.locator(".assistant").count()) !== 1) fail("the refusal became an answer bubble");
  await page.evaluate(() => window.__hog.then((r) => r.text()));

  await page.screenshot({ path: shot, fullPage: true });

  // 5. clear: the conversation is gone from the page and from the server
  await page.click("#clear");
  await page.waitForSelector(".notice:has-text('Conversation cleared.')");
  if ((await page.locator(".assistant").count()) !== 0) fail("answers remain after clear");
  const prompt = await page.evaluate(() => fetch("get_prompt").then((r) => r.json()));
  if (decodeURIComponent(prompt.prompt).includes("stream please")) fail("server history not cleared");
  console.log("webui test passed");
} finally {
  await browser.close();
}
