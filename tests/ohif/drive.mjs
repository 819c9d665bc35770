// Drives Debian's headless Chromium through the OHIF viewer like a reader would, for tests/test_ohif.py.
//
//   node drive.mjs '<request JSON>'
//
// request: {chromium, url, labels: [...], jumpTo, screenshot, failureScreenshot, timeoutMs,
//           sr?: {description, count, screenshot}, srOnly?}   (srOnly: skip the SEG, open the SR only)
// Prints one JSON line on stdout: {ok, step, error?, segmentLabels, serviceSegments, viewport, measurements?, ...};
// progress and the browser's console go to stderr.  Every request outside 127.0.0.1 is refused.
import { createRequire } from 'node:module';
import fs from 'node:fs';
import os from 'node:os';
import path from 'node:path';

const require = createRequire(import.meta.url);
const { chromium } = require('playwright-core');

const request = JSON.parse(process.argv[2]);
const timeoutMs = request.timeoutMs ?? 180_000;
const labels = request.labels ?? [];
const report = { ok: false, step: 'launch', segmentLabels: [], blocked: [], consoleErrors: [], failedRequests: [] };
const log = (...args) => console.error(`[drive ${new Date().toISOString().slice(11, 23)}]`, ...args);

function finish(code) {
  process.stdout.write(JSON.stringify(report) + '\n');
  process.exit(code);
}

// A hard stop in case the browser wedges: the report still says which step it was at.
const watchdog = setTimeout(() => {
  report.error = `gave up after ${timeoutMs} ms at step "${report.step}"`;
  finish(1);
}, timeoutMs + 15_000);

const userDataDir = fs.mkdtempSync(path.join(os.tmpdir(), 'ohif-chromium-'));
let context;
try {
  context = await chromium.launchPersistentContext(userDataDir, {
    executablePath: request.chromium,
    headless: true,
    args: [
      '--headless', '--no-sandbox', '--disable-gpu', '--disable-background-networking',
      '--disable-component-update', '--no-first-run', '--disable-quic', '--disable-sync',
      // Belt and braces beside the request filter below: no name resolves except the loopback.
      '--host-resolver-rules=MAP * ~NOTFOUND, EXCLUDE 127.0.0.1, EXCLUDE localhost',
    ],
    viewport: { width: 1600, height: 1000 },
    deviceScaleFactor: 1,
    serviceWorkers: 'block',
    timeout: 60_000,
  });
  context.setDefaultTimeout(Math.min(90_000, timeoutMs));
  await context.route('**/*', (route) => {
    const { protocol, hostname } = new URL(route.request().url());
    if (['http:', 'https:', 'ws:', 'wss:'].includes(protocol) && !['127.0.0.1', 'localhost'].includes(hostname)) {
      report.blocked.push(route.request().url().slice(0, 200));
      return route.abort('blockedbyclient');
    }
    return route.continue();
  });
  const page = context.pages()[0] ?? (await context.newPage());
  page.on('console', (m) => {
    if (m.type() === 'error') report.consoleErrors.push(m.text().slice(0, 400));
    if (['error', 'warning'].includes(m.type())) log(`console.${m.type()}:`, m.text().slice(0, 400));
  });
  page.on('pageerror', (e) => { report.consoleErrors.push(`pageerror: ${e.message}`.slice(0, 400)); log('pageerror', e.message); });
  page.on('requestfailed', (r) => report.failedRequests.push(`${r.failure()?.errorText} ${r.url().slice(0, 200)}`));
  page.on('response', (r) => { if (r.status() >= 400) report.failedRequests.push(`${r.status()} ${r.url().slice(0, 200)}`); });

  const step = (name) => { report.step = name; log(name); };

  step('open the study');
  await page.goto(request.url, { waitUntil: 'load' });
  const viewport = page.locator('[data-cy="viewport-pane"]').first();
  await viewport.locator('canvas').first().waitFor({ state: 'visible' });

  step('wait for the CT to render (image index in the viewport overlay)');
  const imageIndex = page.locator('[data-cy="viewport-overlay-bottom-right"]').filter({ hasText: /\(\d+\/\d+\)/ });
  await imageIndex.first().waitFor({ state: 'visible' });
  report.imageIndexBefore = (await imageIndex.first().innerText()).trim();

  step('dismiss the first-visit tour if it shows');
  const skipTour = page.getByText('Skip all', { exact: true });
  try {
    await skipTour.waitFor({ state: 'visible', timeout: 8_000 });
    await skipTour.click();
  } catch {
    log('no tour');
  }

  if (!request.srOnly) {
    step('double-click the SEG series in the study browser');
    const segThumbnail = page.locator('[data-cy^="study-browser-thumbnail"]').filter({
      has: page.locator('[data-cy="series-modality-label"]', { hasText: /^\s*SEG\s*$/ }),
    });
    await segThumbnail.first().waitFor({ state: 'visible' });
    report.segSeriesText = (await segThumbnail.first().innerText()).replace(/\s+/g, ' ').trim();
    await segThumbnail.first().dblclick();

    step('accept "open this Segmentation?" (or LOAD) in the viewport');
    const yes = viewport.getByRole('button', { name: 'Yes', exact: true });
    const load = viewport.getByText('LOAD', { exact: true });
    await yes.or(load).first().waitFor({ state: 'visible', timeout: 60_000 });
    if (await yes.isVisible()) await yes.click();
    else await load.click();
    await yes.waitFor({ state: 'hidden' });

    step('open the segmentation panel');
    const rows = page.locator('[data-cy="data-row"]');
    if (!(await rows.first().isVisible())) await page.click('[data-cy="panelSegmentation-btn"]');
    for (const label of labels) {
      await rows.filter({ hasText: label }).first().waitFor({ state: 'visible', timeout: 60_000 });
    }
    report.segmentLabels = (await rows.allInnerTexts()).map((t) => t.split('\n').map((s) => s.trim()).filter(Boolean).at(-1));

    step("read the viewer's segmentation service");
    report.serviceSegments = await page.evaluate(() =>
      (window.services?.segmentationService?.getSegmentations() ?? []).map((s) => ({
        label: s.label,
        segments: Object.values(s.segments ?? {}).filter(Boolean).map((g) => g.label),
      })),
    );

    if (request.jumpTo) {
      step(`click ${request.jumpTo} in the panel (jumps to its slice)`);
      await rows.filter({ hasText: request.jumpTo }).first().click();
    }
    // Away from the panel and the viewport, so no hover card covers the image.
    await page.mouse.move(60, 980);
    await page.waitForLoadState('networkidle');
    await page.waitForTimeout(2_000); // the overlay is drawn on the next render frames

    step('screenshot');
    report.imageIndex = (await imageIndex.first().innerText()).trim();
    const box = await viewport.locator('canvas').first().boundingBox();
    report.viewport = { ...box, pageWidth: page.viewportSize().width };
    await page.screenshot({ path: request.screenshot, fullPage: false });
  }

  if (request.sr) {
    step('double-click the SR series in the study browser');
    const srThumbnail = page.locator('[data-cy^="study-browser-thumbnail"]').filter({
      has: page.locator('[data-cy="series-modality-label"]', { hasText: /^\s*SR\s*$/ }),
      hasText: request.sr.description,
    });
    await srThumbnail.first().dblclick();

    step('accept "continue tracking" (take the SR\'s measurements into the measurement panel)');
    await page.locator('[data-cy="yes-hydrate-btn"]').click({ timeout: 60_000 });

    step('open the measurement panel');
    const panel = page.locator('[data-cy="trackedMeasurements-panel"]').first();
    if (!(await panel.isVisible())) await page.click('[data-cy="trackedMeasurements-btn"]');
    const measurementRows = panel.locator('[data-cy="data-row"]');
    await measurementRows.nth(request.sr.count - 1).waitFor({ state: 'visible', timeout: 60_000 });

    step('scroll the viewport away from the measured slices');
    const canvasBox = await viewport.locator('canvas').first().boundingBox();
    await page.mouse.move(canvasBox.x + canvasBox.width / 2, canvasBox.y + canvasBox.height / 2);
    for (let i = 0; i < 12; i++) {
      await page.mouse.wheel(0, 120);
      await page.waitForTimeout(100);
    }
    report.sliceBeforeMeasurements = (await imageIndex.first().innerText()).trim();

    step('click each measurement in the panel (jumps to its slice, where the viewer computes its numbers)');
    report.measurementSlices = [];
    for (let i = 0; i < (await measurementRows.count()); i++) {
      await measurementRows.nth(i).click();
      await page.waitForTimeout(1_500);
      report.measurementSlices.push((await imageIndex.first().innerText()).trim());
    }
    report.measurements = await page.evaluate(() =>
      (window.services?.measurementService?.getMeasurements() ?? []).map((m) => ({
        finding: m.finding?.text,  // what the panel shows as the measurement's name (its label is unset)
        toolName: m.toolName,
        primary: m.displayText?.primary ?? [],
        referencedImageId: m.referencedImageId,
      })),
    );
    await page.mouse.move(60, 980);
    await page.waitForTimeout(1_000);
    await page.screenshot({ path: request.sr.screenshot, fullPage: false });
  }
  report.ok = true;
  report.step = 'done';
} catch (error) {
  report.error = String(error?.message ?? error).replace(/\x1b\[[0-9;]*m/g, '').split('\n').slice(0, 6).join('\n');
  log('failed at', report.step, report.error);
  try {
    const page = context?.pages()[0];
    if (page && request.failureScreenshot) await page.screenshot({ path: request.failureScreenshot });
    if (page) report.pageText = (await page.evaluate(() => document.body.innerText)).slice(0, 3000);
    if (page) report.segmentLabels = await page.$$eval('[data-cy="data-row"]', (rows) => rows.map((r) => r.innerText.trim()));
  } catch (e) {
    log('no failure screenshot:', e.message);
  }
} finally {
  clearTimeout(watchdog);
  await context?.close().catch(() => {});
  fs.rmSync(userDataDir, { recursive: true, force: true });
}
report.consoleErrors = report.consoleErrors.slice(0, 30);
report.failedRequests = report.failedRequests.slice(0, 30);
finish(report.ok ? 0 : 1);
