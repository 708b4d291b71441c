/** What an import could not carry over, and what it left out on purpose, each with where it was. */
import { describe, type XmlElement } from './xml-tree.ts';

export interface NotCarried {
  /** The element or setting, as it reads in the file, and where it is. */
  what: string;
  /** Why vmferry does not carry it, and what the user can do instead. */
  why: string;
}

export class Findings {
  readonly notCarried: NotCarried[] = [];
  readonly ignored: string[] = [];

  /** Something the guest or the user will miss: an element, or `detail` of it. */
  drop(element: XmlElement, why: string, detail?: string): void {
    this.notCarried.push({ what: `${detail ?? describe(element)} at ${element.path}`, why });
  }

  /** A harmless default vmferry has its own version of. */
  ignore(element: XmlElement, note: string, detail?: string): void {
    this.ignored.push(`${detail ?? describe(element)} at ${element.path}: ${note}`);
  }
}
