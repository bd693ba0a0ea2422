/* Long lines of code and printed output wrap instead of scrolling sideways.

   The book's code column is about 90 characters wide at 0.74rem; library source shown with
   inspect.getsource and some printed lines are longer. Each line of a listing becomes a block that
   wraps with a hanging indent: its continuation starts 4 columns right of where the line's own text
   starts, so a wrapped line never looks like a new statement at the same depth. The text is
   unchanged (every line keeps its newline in a hidden span), so the copy button copies the
   original code. The rows of a table (most lines with several column gaps) keep their columns: a
   wrapped table is harder to read than a scrolled one; one a little too wide is set smaller until
   it fits. Other lines in a table's block (a heading sentence) wrap.
   Without JavaScript the page scrolls as before. */
(function () {
  "use strict";

  // [[nodes of line 0], [nodes of line 1], ...] for a node, splitting its text at "\n";
  // an element split across lines is cloned (shallow) around each piece.
  function splitLines(node) {
    if (node.nodeType === Node.TEXT_NODE) {
      return node.data.split("\n").map(function (t) {
        return t ? [document.createTextNode(t)] : [];
      });
    }
    if (node.nodeType !== Node.ELEMENT_NODE) return [[]];
    var lines = [[]];
    node.childNodes.forEach(function (child) {
      var sub = splitLines(child);
      sub.forEach(function (part, i) {
        if (i > 0) lines.push([]);
        if (part.length) {
          var wrap = node.cloneNode(false);
          part.forEach(function (n) { wrap.appendChild(n); });
          lines[lines.length - 1].push(wrap);
        }
      });
    });
    return lines;
  }

  // a table row: at least three column gaps (two or more spaces between words)
  function isRow(line) {
    return (line.trim().match(/\S {2,}(?=\S)/g) || []).length >= 3;
  }

  function looksLikeTable(text) {
    var rows = text.split("\n").filter(function (l) { return l.trim(); });
    return rows.length >= 3 && rows.filter(isRow).length >= 0.6 * rows.length;
  }

  // A table a little wider than the column is drawn in a smaller font until it fits (down to
  // 72% of the code font); a wider one keeps its size and scrolls. Hidden tables (collapsed
  // outputs) are fitted when they are shown.
  function fitTable(pre) {
    pre.style.fontSize = "";
    if (!pre.clientWidth || pre.scrollWidth <= pre.clientWidth) return;
    var style = getComputedStyle(pre);
    var pad = parseFloat(style.paddingLeft) + parseFloat(style.paddingRight);
    var ratio = (pre.clientWidth - pad) / (pre.scrollWidth - pad);
    if (ratio >= 0.72) pre.style.fontSize = (parseFloat(style.fontSize) * ratio * 0.98) + "px";
  }

  var tables = [];

  function wrap(pre) {
    if (pre.classList.contains("sd-wrap")) return;
    var text = pre.textContent;
    var longest = Math.max.apply(null, text.split("\n").map(function (l) { return l.length; }));
    if (longest < 60) return;                            // nothing to wrap
    var table = looksLikeTable(text);                    // its rows keep their columns
    var lines = [[]];
    Array.prototype.slice.call(pre.childNodes).forEach(function (child) {
      splitLines(child).forEach(function (part, i) {
        if (i > 0) lines.push([]);
        part.forEach(function (n) { lines[lines.length - 1].push(n); });
      });
    });
    if (lines.length > 1 && lines[lines.length - 1].length === 0) lines.pop();  // final "\n"
    var frag = document.createDocumentFragment();
    lines.forEach(function (nodes) {
      var line = document.createElement("span");
      line.className = "sd-line";
      var lead = 0;
      var s = nodes.map(function (n) { return n.textContent; }).join("");
      while (lead < s.length && s[lead] === " ") lead++;
      var hang = Math.min(lead, 40) + 4;
      line.style.paddingLeft = hang + "ch";
      line.style.textIndent = -hang + "ch";
      nodes.forEach(function (n) { line.appendChild(n); });
      if (!s) line.className += " sd-empty";                 // keeps its height (course.css)
      if (table && isRow(s)) line.className += " sd-row";    // never wraps (course.css)
      var nl = document.createElement("span");
      nl.className = "sd-nl";
      nl.textContent = "\n";
      line.appendChild(nl);
      frag.appendChild(line);
    });
    while (pre.firstChild) pre.removeChild(pre.firstChild);
    pre.appendChild(frag);
    pre.classList.add("sd-wrap");
    if (table) {
      pre.classList.add("sd-table");
      tables.push(pre);
    }
  }

  function fitTables() { tables.forEach(fitTable); }

  function run() {
    document.querySelectorAll("div.cell div.highlight pre, div.cell_output pre, " +
                              "article div.highlight pre").forEach(wrap);
    fitTables();
    window.addEventListener("load", fitTables);                 // after fonts and images
    var timer;
    window.addEventListener("resize", function () { clearTimeout(timer); timer = setTimeout(fitTables, 150); });
    document.addEventListener("toggle", fitTables, true);     // <details> opened
    document.addEventListener("click", function () { setTimeout(fitTables, 50); });  // toggle buttons
  }

  if (document.readyState === "loading") document.addEventListener("DOMContentLoaded", run);
  else run();
})();
