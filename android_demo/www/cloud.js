// The cloud side: any OpenAI-compatible endpoint, streamed (server-sent events). By default the app's own /v1,
// which `edgelm app serve` proxies to the configured cloud, adding the cloud's key there.

export class CloudError extends Error {
  constructor(reason, message) {
    super(message);
    this.reason = reason;  // unreachable | http_NNN | deadline | malformed | no_cloud
  }
}

/** Stream a completion (or a chat answer) from `base`; onText(delta) per piece.
 * Returns {text, finish, ttft, seconds}. */
export async function cloudComplete(base, prompt, { maxTokens, key = '', model = '', chat = false, onText,
                                                    deadline = 15 }) {
  const ctl = new AbortController();
  const timer = setTimeout(() => ctl.abort(), deadline * 1000);  // until the first byte
  const body = { max_tokens: maxTokens, temperature: 0, stream: true, ...(model ? { model } : {}) };
  if (chat) body.messages = [{ role: 'user', content: prompt }];
  else body.prompt = prompt;
  const headers = { 'Content-Type': 'application/json', ...(key ? { Authorization: `Bearer ${key}` } : {}) };
  const t0 = performance.now();
  let resp;
  try {
    resp = await fetch(`${base.replace(/\/$/, '')}/${chat ? 'chat/completions' : 'completions'}`,
                       { method: 'POST', headers, body: JSON.stringify(body), signal: ctl.signal });
  } catch (e) {
    clearTimeout(timer);
    throw ctl.signal.aborted ? new CloudError('deadline', `the cloud did not answer within ${deadline} s`)
                             : new CloudError('unreachable', `the cloud at ${base} is unreachable`);
  }
  clearTimeout(timer);
  if (!resp.ok) {
    let msg = '';
    try { msg = (await resp.json()).error.message; } catch { /* not JSON */ }
    throw new CloudError(resp.status === 503 && /no cloud/.test(msg) ? 'no_cloud' : `http_${resp.status}`,
                         `the cloud answered HTTP ${resp.status}${msg ? `: ${msg}` : ''}`);
  }
  if (!(resp.headers.get('content-type') || '').includes('text/event-stream')) {  // a server that does not stream
    let c = null;
    try { c = (await resp.json()).choices[0]; } catch { /* below */ }
    const whole = c && (chat ? c.message && c.message.content : c.text);
    if (typeof whole !== 'string') throw new CloudError('malformed', 'the cloud sent a malformed answer');
    onText(whole);
    const end = performance.now();
    return { text: whole, finish: c.finish_reason || 'stop', ttft: (end - t0) / 1000, seconds: (end - t0) / 1000 };
  }
  const reader = resp.body.pipeThrough(new TextDecoderStream()).getReader();
  let buf = '';
  let text = '';
  let finish = null;
  let tFirst = null;
  for (;;) {
    const { done, value } = await reader.read();
    if (done) break;
    buf += value;
    let i;
    while ((i = buf.indexOf('\n')) >= 0) {
      const line = buf.slice(0, i).trim();
      buf = buf.slice(i + 1);
      if (!line.startsWith('data:')) continue;
      const data = line.slice(5).trim();
      if (data === '[DONE]') { finish = finish || 'stop'; continue; }
      let chunk;
      try { chunk = JSON.parse(data); } catch {
        throw new CloudError('malformed', 'the cloud sent a malformed stream');
      }
      const c = chunk.choices && chunk.choices[0];
      if (!c) continue;
      const delta = chat ? (c.delta && c.delta.content) || '' : c.text || '';
      if (delta) {
        if (tFirst === null) tFirst = performance.now();
        text += delta;
        onText(delta);
      }
      if (c.finish_reason) finish = c.finish_reason;
    }
  }
  if (finish === null) throw new CloudError('cut', 'the cloud stream ended early');
  const end = performance.now();
  return { text, finish, ttft: tFirst === null ? null : (tFirst - t0) / 1000, seconds: (end - t0) / 1000 };
}
