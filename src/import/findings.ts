/** What an import could not carry over, and what it left out on purpose, each with where it was. */
import { describe, type XmlElement } from './xml-tree.ts';

export interface NotCarried {
  /** The element or setting, as it reads in the file, and where it is. */
  what: string;
  /** Why vmferry does not carry it, and what the user can do instead. */
  why: string;
}

/** Findings in the order of the file, as the user reads it, whatever order the mapping visits it in. */
export class Findings {
  readonly #notCarried: { position: number; item: NotCarried }[] = [];
  readonly #ignored: { position: number; item: string }[] = [];

  /** Something the guest or the user will miss: an element, or `detail` of it. */
  drop(element: XmlElement, why: string, detail?: string): void {
    this.#notCarried.push({ position: element.position, item: { what: `${detail ?? describe(element)} at ${element.path}`, why } });
  }

  /** A harmless default vmferry has its own version of. */
  ignore(element: XmlElement, note: string, detail?: string): void {
    this.#ignored.push({ position: element.position, item: `${detail ?? describe(element)} at ${element.path}: ${note}` });
  }

  get notCarried(): NotCarried[] {
    return inDocumentOrder(this.#notCarried);
  }

  get ignored(): string[] {
    return inDocumentOrder(this.#ignored);
  }
}

function inDocumentOrder<T>(entries: { position: number; item: T }[]): T[] {
  // Array.prototype.sort is stable: findings on one element keep the order they were made in.
  return [...entries].sort((a, b) => a.position - b.position).map((entry) => entry.item);
}
