// The page's copy of edgelm's router and privacy guard. Pure functions, no DOM: tests run them in node too.
// topEntropy mirrors edgelm.metrics.top_entropy; the privacy rules come from app.json (edgelm.coop.privacy).

/** Mean over draft steps of -sum(p * log p) over each step's top-n log-probs (largest first), in nats. */
export function topEntropy(steps) {
  if (!steps.length) return 0;
  let total = 0;
  for (const step of steps) {
    let h = 0;
    for (const lp of step) h -= Math.exp(lp) * lp;
    total += h;
  }
  return total / steps.length;
}

export function luhn(s) {
  const digits = [...s].filter((c) => c >= '0' && c <= '9').map(Number);
  if (digits.length < 13 || digits.length > 19) return false;
  let total = 0;
  digits.reverse().forEach((d, i) => {
    if (i % 2) d = d * 2 > 9 ? d * 2 - 9 : d * 2;
    total += d;
  });
  return total % 10 === 0;
}

const CHECKS = { luhn };

/** A guard from app.json's table: flags(text) -> names of the detectors that fire. */
export function makeGuard(table) {
  const rules = table.map((d) => {
    if (d.check && !CHECKS[d.check]) throw new Error(`unknown privacy check ${d.check}`);
    return { name: d.name, re: new RegExp(d.pattern, 'g'), check: d.check ? CHECKS[d.check] : null };
  });
  return {
    flags(text) {
      return rules.filter((r) => [...text.matchAll(r.re)].some((m) => !r.check || r.check(m[0]))).map((r) => r.name);
    },
  };
}

/**
 * Where a query goes before any draft: 'device', 'cloud' or 'draft' (auto mode: score the device's draft first).
 * privateFlags: detectors that fired (or ['marked private']); such a query never leaves the device.
 */
export function firstRoute(mode, privateFlags, cloudAvailable) {
  if (privateFlags.length) {
    return { side: 'device', reason: `private (${privateFlags.join(', ')}): kept on the device` };
  }
  if (mode === 'device') return { side: 'device', reason: 'device mode' };
  if (!cloudAvailable) return { side: 'device', reason: 'no cloud configured' };
  if (mode === 'cloud') return { side: 'cloud', reason: 'cloud mode' };
  return { side: 'draft', reason: '' };
}

/** Auto mode after the draft: above the threshold goes to the cloud. */
export function afterDraft(route, score) {
  const { router, threshold } = route;
  if (router === 'always-device') return { side: 'device', reason: 'router always-device' };
  if (router === 'always-cloud') return { side: 'cloud', reason: 'router always-cloud' };
  const cmp = score > threshold ? '>' : '≤';
  return { side: score > threshold ? 'cloud' : 'device',
           reason: `router ${router}: score ${score.toFixed(3)} ${cmp} threshold ${threshold.toFixed(3)}` };
}
