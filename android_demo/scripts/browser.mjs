// Drives the app in Debian's chromium (playwright-core, never a downloaded browser) as a Pixel 7, for tests/app and
// benchmarks/app.py (through edgelm/app/browser.py). Usage: node browser.mjs PLAYWRIGHT_DIR CHROMIUM, then one JSON
// step per line on stdin; each step's answer is one JSON line on stdout ({"seen": ..., "v1_requests": N} or
// {"error": ...}). Every request that does not go to 127.0.0.1 is aborted and listed under "blocked".
import { createRequire } from 'node:module';
import { createInterface } from 'node:readline';

const require = createRequire(import.meta.url);
const { chromium } = require(process.argv[2]);  // android_demo/node_modules/playwright-core
const plan = { chromium: process.argv[3] };

const browser = await chromium.launch({
  executablePath: plan.chromium || '/usr/bin/chromium',
  args: ['--no-sandbox', '--disable-gpu', '--disable-quic', '--no-first-run', '--disable-background-networking',
         '--disable-component-update', '--disable-sync'],
});
const out = { console: [], blocked: [] };
const counts = { v1: 0 };
try {
  const context = await browser.newContext({
    viewport: { width: 412, height: 915 }, deviceScaleFactor: 2.625, isMobile: true, hasTouch: true,
    userAgent: 'Mozilla/5.0 (Linux; Android 14; Pixel 7) AppleWebKit/537.36 (KHTML, like Gecko) Chrome/156.0 Mobile ' +
               'Safari/537.36',
  });
  await context.route('**/*', (route) => {
    const host = new URL(route.request().url()).hostname;
    if (host === '127.0.0.1') return route.continue();
    out.blocked.push(route.request().url());
    return route.abort();
  });
  context.on('request', (req) => { if (new URL(req.url()).pathname.includes('/v1/')) counts.v1 += 1; });
  const page = await context.newPage();
  page.on('console', (m) => out.console.push(m.text().slice(0, 300)));
  page.on('pageerror', (e) => out.console.push(`pageerror: ${e.message}`));
  const ready = async () => {
    await page.waitForFunction(() => window.edgelmApp && window.edgelmApp.ready, null, { timeout: 60000 });
    await page.evaluate(() => window.edgelmApp.ready);
    return page.evaluate(() => ({ loaded: Boolean(window.edgelmApp.device), loadError: window.edgelmApp.loadError,
      info: document.getElementById('model-info').textContent, error: document.getElementById('error').textContent,
      threads: window.edgelmApp.device && window.edgelmApp.device.threads,
      loadSeconds: window.edgelmApp.device && window.edgelmApp.device.loadSeconds }));
  };
  for await (const line of createInterface({ input: process.stdin })) {
    if (!line.trim()) continue;
    const step = JSON.parse(line);
    if (step.do === 'quit') break;
    const before = counts.v1;
    try {
      let seen;
      if (step.do === 'open') {
        await page.goto(step.url);
        seen = await ready();
      } else if (step.do === 'reload') {
        await page.reload();
        seen = await ready();
      } else if (step.do === 'offline') {
        await context.setOffline(Boolean(step.value));
        seen = { offline: Boolean(step.value) };
      } else if (step.do === 'settings') {
        seen = await page.evaluate((s) => {
          for (const [id, v] of Object.entries(s.values)) {
            const el = document.getElementById(id);
            el.value = v;
            el.dispatchEvent(new Event('change'));
          }
          return true;
        }, step);
      } else if (step.do === 'wait-sw') {
        seen = await page.evaluate(async () => {
          const reg = await navigator.serviceWorker.ready;
          return Boolean(reg.active);
        });
      } else if (step.do === 'quota') {
        const cdp = await context.newCDPSession(page);
        await cdp.send('Storage.overrideQuotaForOrigin', { origin: step.origin, quotaSize: step.bytes });
        seen = true;
      } else if (step.do === 'run') {
        await page.fill('#prompt', step.prompt);
        await page.fill('#max-tokens', String(step.maxTokens || 16));
        await page.check(`input[name=mode][value=${step.mode || 'device'}]`);
        await page.setChecked('#private', Boolean(step.private));
        await page.setChecked('#chat', Boolean(step.chat));
        await page.evaluate(() => { window.edgelmApp.last = null; });
        await page.click('#run');
        await page.waitForFunction(() => window.edgelmApp.last !== null, null, { timeout: step.timeout || 120000 });
        seen = await page.evaluate(() => ({ ...window.edgelmApp.last,
          error: document.getElementById('error').textContent, badge: document.getElementById('route').textContent,
          stats: document.getElementById('stats').textContent }));
      } else if (step.do === 'throttle') {  // DevTools CPU throttling of the page (1: none), as a slower phone
        if (!out.cdp) out.cdp = await context.newCDPSession(page);
        await out.cdp.send('Emulation.setCPUThrottlingRate', { rate: step.rate });
        seen = step.rate;
      } else if (step.do === 'bench') {  // the bench page of `edgelm bench --device browser`, until it is done
        await page.goto(step.url);
        await page.waitForFunction(() => window.edgelmBench && window.edgelmBench.done, null,
                                   { timeout: step.timeout || 600000, polling: 500 });
        seen = await page.evaluate(() => ({ error: window.edgelmBench.error, rows: window.edgelmBench.rows.length }));
      } else if (step.do === 'screenshot') {
        await page.screenshot({ path: step.path, fullPage: false });
        seen = step.path;
      } else if (step.do === 'profile') {  // where a token's time goes: llama_decode, the top-n softmax, detokenize
        seen = await page.evaluate(async ({ prompt, n }) => {
          const w = window.edgelmApp.device.wllama;
          if (!w) return null;  // wllama's calls only
          const ids = await w.tokenize(prompt, true);
          const ms = { decode: 0, top_n: 0, sample: 0, detokenize: 0 };
          await w.kvClear();
          await w.decode(ids, {});
          for (let i = 0; i < n; i++) {
            let t = performance.now();
            const top = await w.getLogits(5);
            ms.top_n += performance.now() - t;
            t = performance.now();
            await w.samplingSample();
            ms.sample += performance.now() - t;
            t = performance.now();
            await w.detokenize([top[0].token]);
            ms.detokenize += performance.now() - t;
            t = performance.now();
            await w.decode([top[0].token], {});
            ms.decode += performance.now() - t;
          }
          for (const k of Object.keys(ms)) ms[k] /= n;
          return ms;
        }, step);
      } else if (step.do === 'log') {
        seen = { console: out.console.splice(0), blocked: out.blocked.splice(0) };
      } else {
        throw new Error(`unknown step ${step.do}`);
      }
      console.log(JSON.stringify({ seen, v1_requests: counts.v1 - before }));
    } catch (e) {
      console.log(JSON.stringify({ error: String(e.message || e).split('\n')[0] }));
    }
  }
} finally {
  await browser.close();
}
