import type { FastifyReply } from 'fastify';

/** Aborts when the client goes away before the reply is sent, so a long wait stops with it. */
export function replySignal(reply: FastifyReply): AbortSignal {
  const controller = new AbortController();
  reply.raw.once('close', () => {
    if (!reply.raw.writableFinished) controller.abort(new Error('the client closed the request'));
  });
  return controller.signal;
}
