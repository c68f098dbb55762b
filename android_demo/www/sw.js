// Offline: the app's files are cached at install and refreshed whenever the network answers; models are cached by
// the page itself (device.js, after their sha256 check) and served from there. /v1 (the cloud) is never cached.
const SHELL = 'edgelm-app-v1';

self.addEventListener('install', (event) => {  // app.json lists the app's own files (edgelm app build writes it)
  event.waitUntil(fetch('app.json').then((r) => r.json())
    .then((app) => caches.open(SHELL).then((c) => c.addAll(['./', 'app.json', ...app.shell])))
    .then(() => self.skipWaiting()));
});

self.addEventListener('activate', (event) => event.waitUntil(self.clients.claim()));

self.addEventListener('fetch', (event) => {
  const url = new URL(event.request.url);
  if (event.request.method !== 'GET' || url.origin !== self.location.origin) return;
  const path = url.pathname;
  if (path.includes('/v1/') || path.includes('/edgelm-bench/') || path.endsWith('/edgelm-serve.json')) return;  // live
  if (path.includes('/models/')) {  // large and checked by sha256: cache first
    event.respondWith(caches.match(event.request).then((hit) => hit || fetch(event.request)));
    return;
  }
  event.respondWith(fetch(event.request).then((resp) => {  // network first, so a rebuilt app shows at once
    if (resp.ok) {
      const copy = resp.clone();
      caches.open(SHELL).then((c) => c.put(event.request, copy));
    }
    return resp;
  }).catch(() => caches.match(event.request, { ignoreSearch: true }).then((hit) => hit || Response.error())));
});
