// Puts an app folder into the Android project: copies it to dist/ (Capacitor's webDir) and runs `cap sync android`,
// which copies dist/ into android/app/src/main/assets/public (generated, not checked in) and refreshes the
// project's Capacitor files (checked in; tests/app/test_android.py checks they are what sync writes).
//   node scripts/sync.mjs [APP_FOLDER]     APP_FOLDER: what `edgelm app build` wrote (default: www, the bare page)
import { cpSync, existsSync, rmSync } from 'node:fs';
import { execFileSync } from 'node:child_process';
import { dirname, join, resolve } from 'node:path';
import { fileURLToPath } from 'node:url';

const root = join(dirname(fileURLToPath(import.meta.url)), '..');
const src = resolve(process.argv[2] || join(root, 'www'));
const dist = join(root, 'dist');
if (!existsSync(join(src, 'index.html'))) {
  console.error(`${src} has no index.html: pass the folder \`edgelm app build\` wrote`);
  process.exit(2);
}
if (!existsSync(join(src, 'vendor', 'wllama', 'index.js'))) {
  console.error(`${src} has no vendor/wllama: run \`npm run vendor\` (or \`make app-deps\`) first`);
  process.exit(2);
}
if (src !== dist) {
  rmSync(dist, { recursive: true, force: true });
  cpSync(src, dist, { recursive: true });
}
execFileSync(join(root, 'node_modules', '.bin', 'cap'), ['sync', 'android'], { cwd: root, stdio: 'inherit' });
