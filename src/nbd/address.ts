import { Type, type Static } from '@sinclair/typebox';
import { hostPathSchema } from '../util/host-path.ts';

/** Where an NBD server listens: what a VM spec's disks, QEMU's blockdev and vmferry's own NBD client take. */
export const NbdServerAddressSchema = Type.Union([
  Type.Object({ type: Type.Literal('inet'), host: Type.String({ minLength: 1, maxLength: 255 }), port: Type.Integer({ minimum: 1, maximum: 65535 }) }),
  Type.Object({ type: Type.Literal('unix'), path: hostPathSchema }),
]);
export type NbdServerAddress = Static<typeof NbdServerAddressSchema>;
