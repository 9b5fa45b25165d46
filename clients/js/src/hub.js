// EventHub: hands each event to request waiters, then to handlers of its type, then to
// "*" handlers, in the order the events happened. A handler that throws (or whose
// promise rejects) is logged and never stops delivery to the others.

import { ClientClosedError, TimeoutError } from "./errors.js";

export class EventHub {
  #handlers = new Map(); // event type (or "*") -> Set of handlers
  #waiters = new Set(); // {predicate, resolve, reject, timer}
  #closed = false;
  #log;

  constructor(log) {
    this.#log = log;
  }

  on(type, handler) {
    if (typeof handler !== "function") {
      throw new TypeError("on(type, handler): handler must be a function");
    }
    if (!this.#handlers.has(type)) {
      this.#handlers.set(type, new Set());
    }
    this.#handlers.get(type).add(handler);
    return () => this.off(type, handler);
  }

  off(type, handler) {
    this.#handlers.get(type)?.delete(handler);
  }

  /** A promise of the next event for which `predicate` holds; TimeoutError after `timeout` ms (none: no limit). */
  expect(predicate, timeout, what) {
    if (this.#closed) {
      return Promise.reject(new ClientClosedError());
    }
    return new Promise((resolve, reject) => {
      const waiter = { predicate, resolve, reject, timer: null };
      if (timeout !== undefined && timeout !== null) {
        waiter.timer = setTimeout(
          () => this.#settle(waiter, null, new TimeoutError(`no ${what} within ${timeout} ms`)),
          timeout,
        );
      }
      this.#waiters.add(waiter);
    });
  }

  deliver(event) {
    for (const waiter of [...this.#waiters]) {
      let matches = false;
      try {
        matches = waiter.predicate(event);
      } catch (err) {
        this.#settle(waiter, null, err);
        continue;
      }
      if (matches) {
        this.#settle(waiter, event, null);
      }
    }
    for (const type of [event.type, "*"]) {
      for (const handler of [...(this.#handlers.get(type) ?? [])]) {
        this.#call(handler, event);
      }
    }
  }

  /** Fail every waiter, now and from now on (handlers stay: they still get the last events). */
  close() {
    this.#closed = true;
    for (const waiter of [...this.#waiters]) {
      this.#settle(waiter, null, new ClientClosedError());
    }
  }

  #call(handler, event) {
    const failed = (err) =>
      this.#log("error", `a handler of ${event.type} failed`, { error: String(err?.stack ?? err) });
    try {
      const result = handler(event);
      if (result && typeof result.then === "function") {
        result.then(undefined, failed);
      }
    } catch (err) {
      failed(err);
    }
  }

  #settle(waiter, event, error) {
    if (!this.#waiters.delete(waiter)) {
      return;
    }
    clearTimeout(waiter.timer);
    if (error) {
      waiter.reject(error);
    } else {
      waiter.resolve(event);
    }
  }
}
