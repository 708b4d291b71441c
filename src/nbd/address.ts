/** Where an NBD server listens: what a VM spec's disks, QEMU's blockdev and vmferry's own NBD client take. */
export type NbdServerAddress = { type: 'inet'; host: string; port: number } | { type: 'unix'; path: string };
