/** A kernel image for tests whose VM never runs guest code (paused QEMUs for QMP tests). */
import { readdirSync } from 'node:fs';

export function hostKernel(): string {
  const kernels = readdirSync('/boot').filter((name) => name.startsWith('vmlinuz-')).sort();
  const newest = kernels.at(-1);
  if (!newest) throw new Error('no /boot/vmlinuz-*: run scripts/setup.sh (it installs linux-image-amd64)');
  return `/boot/${newest}`;
}
