// harness report: sortable tables and the per-utterance filter; no framework, nothing fetched.
// An error anywhere is shown at the top of the page; <body data-js="ok"> says the script ran.
(function () {
  "use strict";
  window.addEventListener("error", function (event) {
    var box = document.getElementById("js-errors");
    box.hidden = false;
    box.textContent += "script error: " + event.message + " ";
    document.body.setAttribute("data-js", "error");
  });

  // a cell's sort key: its data-v number (empty: missing, sorted last), else its text
  function key(row, column) {
    var cell = row.cells[column];
    if (!cell) return [2, ""];
    if (cell.hasAttribute("data-v")) {
      var v = cell.getAttribute("data-v");
      return v === "" ? [2, 0] : [0, parseFloat(v)];
    }
    return [1, cell.textContent.toLowerCase()];
  }

  function sortBy(table, column, header) {
    var ascending = header.getAttribute("aria-sort") !== "ascending";
    var body = table.tBodies[0];
    var rows = Array.prototype.slice.call(body.rows);
    var keyed = rows.map(function (row, i) { return [key(row, column), i, row]; });
    keyed.sort(function (a, b) {
      if (a[0][0] !== b[0][0]) return a[0][0] - b[0][0]; // numbers, then text, missing last
      if (a[0][1] < b[0][1]) return ascending ? -1 : 1;
      if (a[0][1] > b[0][1]) return ascending ? 1 : -1;
      return a[1] - b[1]; // stable
    });
    keyed.forEach(function (k) { body.appendChild(k[2]); });
    Array.prototype.forEach.call(header.parentNode.cells, function (th) { th.removeAttribute("aria-sort"); });
    header.setAttribute("aria-sort", ascending ? "ascending" : "descending");
  }

  function initSorting() {
    document.querySelectorAll("table.sortable").forEach(function (table) {
      Array.prototype.forEach.call(table.tHead.rows[0].cells, function (header, column) {
        header.title = "sort by " + header.textContent;
        header.addEventListener("click", function () { sortBy(table, column, header); });
      });
    });
  }

  function initFilter() {
    var table = document.getElementById("utterance-table");
    if (!table) return;
    var text = document.getElementById("utt-filter");
    var model = document.getElementById("utt-model");
    var bad = document.getElementById("utt-bad");
    var count = document.getElementById("utt-count");
    var rows = Array.prototype.slice.call(table.tBodies[0].rows);
    var haystack = rows.map(function (row) { return row.textContent.toLowerCase(); });
    function apply() {
      var query = text.value.trim().toLowerCase();
      var shown = 0;
      rows.forEach(function (row, i) {
        var keep = (!model.value || row.getAttribute("data-model") === model.value) &&
          (!bad.checked || row.getAttribute("data-bad") === "1") &&
          (!query || haystack[i].indexOf(query) !== -1);
        row.hidden = !keep;
        if (keep) shown += 1;
      });
      count.textContent = shown + " of " + rows.length + " rows";
    }
    text.addEventListener("input", apply);
    model.addEventListener("change", apply);
    bad.addEventListener("change", apply);
    apply();
  }

  initSorting();
  initFilter();
  if (document.body.getAttribute("data-js") !== "error") document.body.setAttribute("data-js", "ok");
})();
