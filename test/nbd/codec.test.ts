// The wire codecs: what one side encodes, the other decodes to the same thing.
import assert from 'node:assert/strict';
import { test } from 'node:test';
import {
  NbdDecodeError,
  decodeBlockStatus,
  decodeErrorPayload,
  decodeInfo,
  decodeInfoRequest,
  decodeMetaContextRequest,
  decodeOptionHeader,
  decodeOptionReplyHeader,
  decodeReplyHeader,
  decodeRequest,
  decodeServerReply,
  encodeBlockStatus,
  encodeChunkHeader,
  encodeErrorPayload,
  encodeInfoBlockSize,
  encodeInfoExport,
  encodeInfoRequest,
  encodeMetaContextRequest,
  encodeOption,
  encodeOptionReply,
  encodeRequest,
  encodeServerReply,
  encodeSimpleReplyHeader,
} from '../../src/nbd/codec.ts';
import { Command, IHAVEOPT, Info, NbdErrno, Option, OptionReply, ReplyType } from '../../src/nbd/constants.ts';
import { nbdErrnoName, nbdErrnoOf } from '../../src/nbd/errno.ts';
import { NbdBackendError } from '../../src/nbd/backend.ts';

const handle = Buffer.from('0102030405060708', 'hex');

test('requests round-trip, offsets above 2^32 included', () => {
  const request = { flags: 1, type: Command.WRITE, handle, offset: 2 ** 40 + 512, length: 65536 };
  const bytes = encodeRequest(request);
  assert.equal(bytes.length, 28);
  assert.equal(bytes.toString('hex', 0, 4), '25609513');
  assert.deepEqual(decodeRequest(bytes), { ...request, magic: 0x25609513 });
});

test('options and option replies round-trip', () => {
  const option = decodeOptionHeader(encodeOption(Option.GO, encodeInfoRequest('vol', [Info.BLOCK_SIZE, Info.NAME])));
  assert.deepEqual(option, { magic: IHAVEOPT, option: Option.GO, length: 4 + 3 + 2 + 4 });
  assert.deepEqual(decodeInfoRequest(encodeInfoRequest('vol', [Info.BLOCK_SIZE, Info.NAME])), { exportName: 'vol', infos: [Info.BLOCK_SIZE, Info.NAME] });
  assert.deepEqual(decodeMetaContextRequest(encodeMetaContextRequest('v', ['base:allocation', 'x'])), { exportName: 'v', queries: ['base:allocation', 'x'] });
  assert.deepEqual(decodeOptionReplyHeader(encodeOptionReply(Option.LIST, OptionReply.ERR_UNSUP, Buffer.from('no'))), { option: Option.LIST, type: OptionReply.ERR_UNSUP, length: 2 });
  assert.deepEqual(decodeServerReply(encodeServerReply('vol', '4 GiB')), { name: 'vol', description: '4 GiB' });
  assert.deepEqual(decodeInfo(encodeInfoExport(2 ** 33, 0x10d)), { type: 'export', size: 2 ** 33, flags: 0x10d });
  assert.deepEqual(decodeInfo(encodeInfoBlockSize({ minimum: 1, preferred: 4096, maximum: 1 << 25 })), { type: 'block-size', limits: { minimum: 1, preferred: 4096, maximum: 1 << 25 } });
});

test('malformed option data is a decode error, never a read past the buffer', () => {
  assert.throws(() => decodeInfoRequest(Buffer.from([0, 0, 0, 9, 0x61])), NbdDecodeError);
  assert.throws(() => decodeInfoRequest(Buffer.concat([encodeInfoRequest('a', [1]), Buffer.from([0])])), /wrong length/);
  assert.throws(() => decodeMetaContextRequest(Buffer.from([0, 0, 0, 0, 0, 0, 0, 2])), /query 0: length missing/);
  assert.throws(() => decodeOptionReplyHeader(Buffer.alloc(20)), /magic/);
});

test('reply headers, block status and error payloads', () => {
  assert.deepEqual(decodeReplyHeader(encodeSimpleReplyHeader(handle, 22)), { kind: 'simple', errno: 22, handle });
  assert.deepEqual(decodeReplyHeader(encodeChunkHeader(handle, 1, ReplyType.BLOCK_STATUS, 20)), { kind: 'structured', flags: 1, type: ReplyType.BLOCK_STATUS, handle, length: 20 });
  assert.throws(() => decodeReplyHeader(Buffer.alloc(16)), /unknown magic/);
  const extents = [{ length: 4096, flags: 0 }, { length: 8192, flags: 3 }];
  assert.deepEqual(decodeBlockStatus(encodeBlockStatus(1, extents)), { contextId: 1, extents });
  assert.deepEqual(decodeErrorPayload(encodeErrorPayload(5, 'disk on fire')), { errno: 5, message: 'disk on fire' });
});

test('one errno mapping: backend errors, system codes, and everything else as EIO', () => {
  assert.equal(nbdErrnoOf(new NbdBackendError(NbdErrno.EPERM, 'ro')), NbdErrno.EPERM);
  assert.equal(nbdErrnoOf(Object.assign(new Error('full'), { code: 'ENOSPC' })), NbdErrno.ENOSPC);
  assert.equal(nbdErrnoOf(Object.assign(new Error('ro fs'), { code: 'EROFS' })), NbdErrno.EPERM);
  assert.equal(nbdErrnoOf(Object.assign(new Error('?'), { code: 'EBADF' })), NbdErrno.EIO);
  assert.equal(nbdErrnoOf('not even an error'), NbdErrno.EIO);
  assert.equal(nbdErrnoName(22), 'EINVAL');
  assert.equal(nbdErrnoName(99), 'errno 99');
});
