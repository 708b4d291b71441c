/**
 * The vmferry CLI run as a user runs it (a process, its exit code and both
 * streams), and a stand-in controller that records what the CLI asks of it.
 */
import { execFile as execFileCallback } from 'node:child_process';
import { createServer, type IncomingMessage } from 'node:http';
import type { AddressInfo } from 'node:net';
import { join } from 'node:path';
import { promisify } from 'node:util';

const execFile = promisify(execFileCallback);
const cli = join(import.meta.dirname, '../../bin/vmferry.js');

export interface CliResult {
  code: number;
  stdout: string;
  stderr: string;
}

/** `vmferry --controller URL ARGS…`; a non-zero exit is a result, not an error. */
export async function runVmferry(controllerUrl: string, args: string[], timeoutMs = 60_000): Promise<CliResult> {
  try {
    const { stdout, stderr } = await execFile(process.execPath, [cli, '--controller', controllerUrl, ...args], { timeout: timeoutMs });
    return { code: 0, stdout, stderr };
  } catch (err) {
    const failed = err as { code: number; stdout: string; stderr: string };
    return { code: failed.code, stdout: failed.stdout, stderr: failed.stderr };
  }
}

export interface RecordingController {
  url: string;
  /** Every request body, parsed, in order. */
  requests: unknown[];
  close(): Promise<void>;
}

/** A controller that records each request body and answers with `answer(body)`: a status and a JSON body. */
export async function startRecordingController(answer: (body: unknown, request: IncomingMessage) => { status: number; json: unknown }): Promise<RecordingController> {
  const requests: unknown[] = [];
  const server = createServer((req, res) => {
    let text = '';
    req.on('data', (chunk: Buffer) => (text += chunk.toString()));
    req.on('end', () => {
      const body = JSON.parse(text) as unknown;
      requests.push(body);
      const { status, json } = answer(body, req);
      res.writeHead(status, { 'content-type': 'application/json' }).end(JSON.stringify(json));
    });
  });
  await new Promise<void>((resolve) => server.listen(0, '127.0.0.1', resolve));
  return {
    url: `http://127.0.0.1:${(server.address() as AddressInfo).port}`,
    requests,
    close: () => new Promise<void>((resolve) => server.close(() => resolve())),
  };
}
