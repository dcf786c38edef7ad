// Small DOM and LiteGraph helpers shared by the MoLE widgets (mole_heatmap.js, mole_training_panel.js).

/**
 * @param {string} tag @param {string} [cls] @param {string} [text]
 * @returns {HTMLElement}
 */
export function el(tag, cls, text) {
  const e = document.createElement(tag);
  if (cls) e.className = cls;
  if (text !== undefined) e.textContent = text;
  return e;
}

/** Add a `<style id=…>` to the page once. @param {string} id @param {string} css */
export function addStyle(id, css) {
  if (document.getElementById(id)) return;
  const style = el("style", "", css);
  style.id = id;
  document.head.appendChild(style);
}

/**
 * Chain `after` behind a node prototype's method: the original runs first and its result is returned.
 * @param {object} nodeType a LiteGraph node class
 * @param {string} name e.g. "onNodeCreated", "onExecuted", "onConfigure", "onRemoved"
 * @param {(this: any, ...args: any[]) => void} after
 */
export function chainMethod(nodeType, name, after) {
  const original = nodeType.prototype[name];
  nodeType.prototype[name] = function (...args) {
    const result = original?.apply(this, args);
    after.apply(this, args);
    return result;
  };
}
