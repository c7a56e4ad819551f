//! The architecture's rules, checked by `cargo test` so they stay true (issue 20). It parses the
//! sources with `syn`, needs no servers, and lists every violation at once:
//!
//! - no non-test function in `src/` over 80 lines, unless the line above it says
//!   `// long: <reason>`;
//! - no file in `src/` over 700 lines, none in `tests/` or `benches/` over 1,200;
//! - a top-level module imports (`crate::x`) only the modules listed before it in `src/lib.rs`
//!   (test code and `testkit` may import anything);
//! - the sibling files of one folder in `src/` import each other without a circle.

use std::collections::{BTreeMap, BTreeSet, VecDeque};
use std::fs;
use std::path::Path;

use proc_macro2::{Span, TokenStream, TokenTree};
use syn::visit::{self, Visit};

/// The longest a non-test function in `src/` may be, signature line to closing brace.
const MAX_FN_LINES: usize = 80;
/// The longest a file in `src/` may be.
const MAX_SRC_FILE_LINES: usize = 700;
/// The longest a file in `tests/` or `benches/` may be.
const MAX_TEST_FILE_LINES: usize = 1200;
/// The module that may import anything: test data and in-memory doubles.
const TESTKIT: &str = "testkit";

/// One Rust source file of the crate.
struct Source {
    /// Relative to the crate root, e.g. `src/event/mod.rs`.
    path: String,
    /// Its module path in the library (`["event"]` for `src/event/mod.rs`); `None` outside the
    /// library (binaries, tests, benches).
    module: Option<Vec<String>>,
    text: String,
    /// Included only by a `#[cfg(test)] mod x;` (itself or through a parent).
    test_only: bool,
}

/// An import of one module's item from another, as written (`use crate::x::Y`, `super::y::f()`,
/// or inside a macro call).
#[derive(Debug, Clone)]
struct Import {
    path: String,
    line: usize,
    /// The module the import is written in.
    from: Vec<String>,
    /// Where it points, from the crate root.
    to: Vec<String>,
}

// ---------------------------------------------------------------------------------------------
// The checks on the crate.

#[test]
fn no_function_over_80_lines() {
    let violations: Vec<String> = crate_sources()
        .iter()
        .filter(|s| s.path.starts_with("src/") && !s.test_only)
        .flat_map(long_functions)
        .collect();
    assert_none(
        &format!("non-test functions over {MAX_FN_LINES} lines (mark a justified one `// long: <reason>`)"),
        &violations,
    );
}

#[test]
fn no_file_over_its_size() {
    let violations: Vec<String> = crate_sources()
        .iter()
        .filter_map(|s| {
            let limit = if s.path.starts_with("src/") { MAX_SRC_FILE_LINES } else { MAX_TEST_FILE_LINES };
            oversized(&s.path, &s.text, limit)
        })
        .collect();
    assert_none("files over their size (src/: 700 lines, tests/ and benches/: 1,200)", &violations);
}

#[test]
fn modules_import_only_the_ones_before_them() {
    let sources = crate_sources();
    let lib = sources.iter().find(|s| s.path == "src/lib.rs").expect("src/lib.rs");
    let order = module_order(&lib.text);
    let violations = arrows_up(&order, &library_imports(&sources));
    assert_none("imports of a module listed after the importer in src/lib.rs (arrows back up)", &violations);
}

#[test]
fn sibling_files_import_without_circles() {
    let sources = crate_sources();
    let imports = library_imports(&sources);
    let folders: BTreeSet<Vec<String>> =
        sources.iter().filter(|s| s.path.ends_with("/mod.rs")).filter_map(|s| s.module.clone()).collect();
    let violations: Vec<String> =
        folders.iter().flat_map(|folder| sibling_cycles(folder, &children(folder, &sources), &imports)).collect();
    assert_none("circles between sibling files of a folder", &violations);
}

/// Fails listing every violation, if there is any.
fn assert_none(what: &str, violations: &[String]) {
    assert!(violations.is_empty(), "{} {what}:\n  {}\n", violations.len(), violations.join("\n  "));
}

// ---------------------------------------------------------------------------------------------
// Reading the sources.

/// Every `.rs` file under `src/`, `tests/` and `benches/`, in path order.
fn crate_sources() -> Vec<Source> {
    let root = Path::new(env!("CARGO_MANIFEST_DIR"));
    let mut files = Vec::new();
    for dir in ["src", "tests", "benches"] {
        rust_files(root, &root.join(dir), &mut files);
    }
    files.sort();
    let mut sources: Vec<Source> = files
        .into_iter()
        .map(|path| {
            let text = fs::read_to_string(root.join(&path)).unwrap_or_else(|e| panic!("{path}: {e}"));
            Source { module: module_of(&path), path, text, test_only: false }
        })
        .collect();
    mark_test_only(&mut sources);
    sources
}

/// Collects the `.rs` files under `dir`, as paths relative to `root`.
fn rust_files(root: &Path, dir: &Path, out: &mut Vec<String>) {
    let Ok(entries) = fs::read_dir(dir) else { return };
    for entry in entries {
        let path = entry.expect("directory entry").path();
        if path.is_dir() {
            rust_files(root, &path, out);
        } else if path.extension().is_some_and(|e| e == "rs") {
            let relative = path.strip_prefix(root).expect("under the crate root");
            out.push(relative.to_string_lossy().replace('\\', "/"));
        }
    }
}

/// The library module a file holds: `src/lib.rs` → `[]`, `src/a/b.rs` and `src/a/b/mod.rs` →
/// `[a, b]`; `None` for binaries and anything outside `src/`.
fn module_of(path: &str) -> Option<Vec<String>> {
    let inner = path.strip_prefix("src/")?.strip_suffix(".rs")?;
    if inner == "main" || inner.starts_with("bin/") {
        return None;
    }
    let mut module: Vec<String> = inner.split('/').map(str::to_owned).collect();
    if matches!(module.last().map(String::as_str), Some("mod" | "lib")) {
        module.pop();
    }
    Some(module)
}

/// Marks the files that only a `#[cfg(test)] mod x;` brings in (e.g. `src/transform/tests.rs`).
fn mark_test_only(sources: &mut [Source]) {
    let mut test_modules = Vec::new();
    for source in sources.iter() {
        let Some(module) = &source.module else { continue };
        for item in parse(source).items {
            if let syn::Item::Mod(m) = item
                && m.content.is_none()
                && is_test_code(&m.attrs)
            {
                test_modules.push([module.clone(), vec![m.ident.to_string()]].concat());
            }
        }
    }
    for source in sources {
        if let Some(module) = &source.module {
            source.test_only = test_modules.iter().any(|t| module.starts_with(t));
        }
    }
}

fn parse(source: &Source) -> syn::File {
    syn::parse_file(&source.text).unwrap_or_else(|e| panic!("{}: {e}", source.path))
}

/// Whether the attributes make an item test code: `#[cfg(test)]`, `#[cfg(all(test, ..))]`,
/// `#[test]` or a test macro such as `#[tokio::test]`.
fn is_test_code(attrs: &[syn::Attribute]) -> bool {
    attrs.iter().any(|attr| {
        let path = attr.path();
        if path.segments.last().is_some_and(|s| s.ident == "test") {
            return true;
        }
        let syn::Meta::List(list) = &attr.meta else { return false };
        if !path.is_ident("cfg") {
            return false;
        }
        let tokens: Vec<TokenTree> = list.tokens.clone().into_iter().collect();
        match tokens.as_slice() {
            [TokenTree::Ident(i)] => i == "test",
            [TokenTree::Ident(all), TokenTree::Group(g)] if all == "all" => {
                g.stream().into_iter().any(|t| matches!(&t, TokenTree::Ident(i) if i == "test"))
            }
            _ => false,
        }
    })
}

/// An item's attributes (none for kinds that cannot hold test code).
fn item_attrs(item: &syn::Item) -> &[syn::Attribute] {
    match item {
        syn::Item::Const(i) => &i.attrs,
        syn::Item::Enum(i) => &i.attrs,
        syn::Item::Fn(i) => &i.attrs,
        syn::Item::Impl(i) => &i.attrs,
        syn::Item::Macro(i) => &i.attrs,
        syn::Item::Mod(i) => &i.attrs,
        syn::Item::Static(i) => &i.attrs,
        syn::Item::Struct(i) => &i.attrs,
        syn::Item::Trait(i) => &i.attrs,
        syn::Item::Type(i) => &i.attrs,
        syn::Item::Union(i) => &i.attrs,
        syn::Item::Use(i) => &i.attrs,
        _ => &[],
    }
}

fn line(span: Span) -> usize {
    span.start().line
}

// ---------------------------------------------------------------------------------------------
// (a) Long functions.

/// The non-test functions of a file over [`MAX_FN_LINES`], as `file:line: name: N lines`.
fn long_functions(source: &Source) -> Vec<String> {
    let file = parse(source);
    let lines: Vec<&str> = source.text.lines().collect();
    let mut finder = LongFunctions { lines: &lines, owner: None, found: Vec::new() };
    finder.visit_file(&file);
    finder.found.into_iter().map(|(at, name, length)| format!("{}:{at}: {name}: {length} lines", source.path)).collect()
}

/// Walks a file's functions and methods, skipping test code.
struct LongFunctions<'a> {
    lines: &'a [&'a str],
    /// The type or trait whose methods are being walked.
    owner: Option<String>,
    /// (signature line, name, length)
    found: Vec<(usize, String, usize)>,
}

impl LongFunctions<'_> {
    fn measure(&mut self, attrs: &[syn::Attribute], vis: &syn::Visibility, sig: &syn::Signature, body: &syn::Block) {
        let start = signature_line(vis, sig);
        let length = line(body.brace_token.span.close()) + 1 - start;
        let first = attrs.iter().map(|a| line(a.pound_token.span)).fold(start, usize::min);
        if length <= MAX_FN_LINES || self.marked_long(first) {
            return;
        }
        let name = match &self.owner {
            Some(owner) => format!("{owner}::{}", sig.ident),
            None => sig.ident.to_string(),
        };
        self.found.push((start, name, length));
    }

    /// Whether the line just above an item's first line (1-based) is `// long: <reason>`.
    fn marked_long(&self, first: usize) -> bool {
        let above = first.checked_sub(2).and_then(|i| self.lines.get(i)).map(|l| l.trim());
        above.and_then(|l| l.strip_prefix("// long:")).is_some_and(|reason| !reason.trim().is_empty())
    }
}

/// The line a function's signature starts on (its visibility, qualifiers or `fn`).
fn signature_line(vis: &syn::Visibility, sig: &syn::Signature) -> usize {
    let vis = match vis {
        syn::Visibility::Public(p) => Some(p.span),
        syn::Visibility::Restricted(r) => Some(r.pub_token.span),
        syn::Visibility::Inherited => None,
    };
    let qualifier = sig.constness.map(|t| t.span).or(sig.asyncness.map(|t| t.span)).or(match &sig.safety {
        syn::Safety::Safe(t) => Some(t.span),
        syn::Safety::Unsafe(t) => Some(t.span),
        _ => None,
    });
    let abi = sig.abi.as_ref().map(|a| a.extern_token.span);
    [vis, qualifier, abi, Some(sig.fn_token.span)].into_iter().flatten().map(line).min().expect("fn token")
}

impl<'ast> Visit<'ast> for LongFunctions<'_> {
    fn visit_item(&mut self, item: &'ast syn::Item) {
        if !is_test_code(item_attrs(item)) {
            visit::visit_item(self, item);
        }
    }

    fn visit_item_fn(&mut self, f: &'ast syn::ItemFn) {
        let owner = self.owner.take();
        self.measure(&f.attrs, &f.vis, &f.sig, &f.block);
        visit::visit_item_fn(self, f);
        self.owner = owner;
    }

    fn visit_item_impl(&mut self, i: &'ast syn::ItemImpl) {
        let name = match &*i.self_ty {
            syn::Type::Path(p) => p.path.segments.last().map(|s| s.ident.to_string()),
            _ => None,
        };
        let outer = self.owner.replace(name.unwrap_or_else(|| "_".into()));
        visit::visit_item_impl(self, i);
        self.owner = outer;
    }

    fn visit_impl_item_fn(&mut self, f: &'ast syn::ImplItemFn) {
        if !is_test_code(&f.attrs) {
            self.measure(&f.attrs, &f.vis, &f.sig, &f.block);
            visit::visit_impl_item_fn(self, f);
        }
    }

    fn visit_item_trait(&mut self, t: &'ast syn::ItemTrait) {
        let outer = self.owner.replace(t.ident.to_string());
        visit::visit_item_trait(self, t);
        self.owner = outer;
    }

    fn visit_trait_item_fn(&mut self, f: &'ast syn::TraitItemFn) {
        if !is_test_code(&f.attrs) {
            if let Some(body) = &f.default {
                self.measure(&f.attrs, &syn::Visibility::Inherited, &f.sig, body);
            }
            visit::visit_trait_item_fn(self, f);
        }
    }
}

// ---------------------------------------------------------------------------------------------
// (b) Large files.

/// `file: N lines (limit L)` if the text is longer than the limit.
fn oversized(path: &str, text: &str, limit: usize) -> Option<String> {
    let lines = text.lines().count();
    (lines > limit).then(|| format!("{path}: {lines} lines (limit {limit})"))
}

// ---------------------------------------------------------------------------------------------
// Imports, for (c) and (d).

/// The imports between library modules in non-test code.
fn library_imports(sources: &[Source]) -> Vec<Import> {
    sources.iter().filter(|s| !s.test_only).flat_map(imports).collect()
}

/// The imports written in a library file (outside test code) that point into the crate.
fn imports(source: &Source) -> Vec<Import> {
    let Some(module) = &source.module else { return Vec::new() };
    let mut finder = Imports { path: &source.path, here: module.clone(), found: Vec::new() };
    finder.visit_file(&parse(source));
    finder.found
}

/// Walks a file's paths (in `use`, code and macro calls), skipping test code.
struct Imports<'a> {
    path: &'a str,
    /// The module being walked (inline modules nest it).
    here: Vec<String>,
    found: Vec<Import>,
}

impl Imports<'_> {
    fn record(&mut self, at: usize, segments: &[String]) {
        if let Some(to) = resolve(&self.here, segments) {
            self.found.push(Import { path: self.path.to_owned(), line: at, from: self.here.clone(), to });
        }
    }

    /// Records each path of a `use` tree, `prefix` being the segments above it.
    fn use_tree(&mut self, tree: &syn::UseTree, prefix: &mut Vec<String>, at: usize) {
        match tree {
            syn::UseTree::Path(p) => {
                prefix.push(p.ident.to_string());
                self.use_tree(&p.tree, prefix, at);
                prefix.pop();
            }
            syn::UseTree::Name(n) => self.record(at, &[prefix.clone(), vec![n.ident.to_string()]].concat()),
            syn::UseTree::Rename(r) => self.record(at, &[prefix.clone(), vec![r.ident.to_string()]].concat()),
            syn::UseTree::Glob(_) => self.record(at, prefix),
            syn::UseTree::Group(g) => g.items.iter().for_each(|t| self.use_tree(t, prefix, at)),
        }
    }

    /// Records the `crate::a::b`, `super::b` and `self::c` paths in a macro call's tokens.
    fn macro_tokens(&mut self, tokens: TokenStream) {
        let tokens: Vec<TokenTree> = tokens.into_iter().collect();
        let mut i = 0;
        while i < tokens.len() {
            match &tokens[i] {
                TokenTree::Group(g) => self.macro_tokens(g.stream()),
                TokenTree::Ident(first) if first == "crate" || first == "super" || first == "self" => {
                    let mut segments = vec![first.to_string()];
                    while let [TokenTree::Punct(a), TokenTree::Punct(b), TokenTree::Ident(next), ..] = &tokens[i + 1..]
                        && a.as_char() == ':'
                        && b.as_char() == ':'
                    {
                        segments.push(next.to_string());
                        i += 3;
                    }
                    if segments.len() > 1 {
                        self.record(line(first.span()), &segments);
                    }
                }
                _ => {}
            }
            i += 1;
        }
    }
}

/// Where a path written in module `here` points, from the crate root: `crate::a::b` → `[a, b]`,
/// `super::b` in `[x, a]` → `[x, b]`, `self::c` → `here` + `[c]`; `None` for other crates'
/// and local names.
fn resolve(here: &[String], segments: &[String]) -> Option<Vec<String>> {
    let (first, mut rest) = segments.split_first()?;
    let mut to = match first.as_str() {
        "crate" => Vec::new(),
        "self" => here.to_vec(),
        "super" => {
            rest = segments;
            here.to_vec()
        }
        _ => return None,
    };
    while let Some((s, after)) = rest.split_first()
        && s == "super"
    {
        to.pop()?;
        rest = after;
    }
    to.extend(rest.iter().cloned());
    Some(to)
}

impl<'ast> Visit<'ast> for Imports<'_> {
    fn visit_item(&mut self, item: &'ast syn::Item) {
        if !is_test_code(item_attrs(item)) {
            visit::visit_item(self, item);
        }
    }

    fn visit_item_mod(&mut self, m: &'ast syn::ItemMod) {
        if m.content.is_some() {
            self.here.push(m.ident.to_string());
            visit::visit_item_mod(self, m);
            self.here.pop();
        }
    }

    fn visit_impl_item_fn(&mut self, f: &'ast syn::ImplItemFn) {
        if !is_test_code(&f.attrs) {
            visit::visit_impl_item_fn(self, f);
        }
    }

    fn visit_item_use(&mut self, u: &'ast syn::ItemUse) {
        self.use_tree(&u.tree, &mut Vec::new(), line(u.use_token.span));
    }

    fn visit_path(&mut self, p: &'ast syn::Path) {
        let segments: Vec<String> = p.segments.iter().map(|s| s.ident.to_string()).collect();
        if let Some(first) = p.segments.first() {
            self.record(line(first.ident.span()), &segments);
        }
        visit::visit_path(self, p);
    }

    fn visit_macro(&mut self, m: &'ast syn::Macro) {
        self.macro_tokens(m.tokens.clone());
        visit::visit_macro(self, m);
    }
}

// ---------------------------------------------------------------------------------------------
// (c) Arrows back up between top-level modules.

/// The top-level modules in the order `src/lib.rs` lists them.
fn module_order(lib: &str) -> Vec<String> {
    let file = syn::parse_file(lib).expect("src/lib.rs parses");
    file.items
        .iter()
        .filter_map(|item| match item {
            syn::Item::Mod(m) => Some(m.ident.to_string()),
            _ => None,
        })
        .collect()
}

/// The imports from a top-level module of one listed after it, as
/// `file:line: a imports b (listed after it)`; `testkit` may import anything.
fn arrows_up(order: &[String], imports: &[Import]) -> Vec<String> {
    let rank = |m: &str| order.iter().position(|o| o == m);
    let mut found: Vec<String> = imports
        .iter()
        .filter_map(|i| {
            let (from, to) = (i.from.first()?, i.to.first()?);
            let (f, t) = (rank(from)?, rank(to)?);
            (from != TESTKIT && t > f).then(|| format!("{}:{}: {from} imports {to} (listed after it)", i.path, i.line))
        })
        .collect();
    found.dedup();
    found
}

// ---------------------------------------------------------------------------------------------
// (d) Circles between the sibling files of a folder.

/// The child modules of a folder's module, but not its `mod.rs`: `a` for `a.rs` and `a/`.
fn children(folder: &[String], sources: &[Source]) -> BTreeSet<String> {
    sources
        .iter()
        .filter_map(|s| s.module.as_ref())
        .filter(|m| m.len() > folder.len() && m.starts_with(folder))
        .map(|m| m[folder.len()].clone())
        .collect()
}

/// The circles in the import graph between a folder's children, each named
/// `folder: a → b → a (file:line, file:line)`.
fn sibling_cycles(folder: &[String], children: &BTreeSet<String>, imports: &[Import]) -> Vec<String> {
    let child = |m: &[String]| child_of(folder, children, m).map(str::to_owned);
    let mut edges: BTreeMap<(String, String), &Import> = BTreeMap::new();
    for import in imports {
        if let (Some(a), Some(b)) = (child(&import.from), child(&import.to))
            && a != b
        {
            edges.entry((a, b)).or_insert(import);
        }
    }
    let graph = edges.keys().fold(BTreeMap::<&str, BTreeSet<&str>>::new(), |mut g, (a, b)| {
        g.entry(a).or_default().insert(b);
        g
    });
    let name = if folder.is_empty() { "src".to_owned() } else { format!("src/{}", folder.join("/")) };
    cycles(&graph)
        .into_iter()
        .map(|cycle| {
            let at: Vec<String> = cycle
                .windows(2)
                .map(|w| edges[&(w[0].to_owned(), w[1].to_owned())])
                .map(|i| format!("{}:{}", i.path, i.line))
                .collect();
            format!("{name}/: {} ({})", cycle.join(" → "), at.join(", "))
        })
        .collect()
}

/// The child of `folder` a module is in, if it is one of `children`.
fn child_of<'m>(folder: &[String], children: &BTreeSet<String>, module: &'m [String]) -> Option<&'m str> {
    let child = module.get(folder.len()).filter(|c| module.starts_with(folder) && children.contains(*c))?;
    Some(child.as_str())
}

/// One circle per strongly connected group of the graph, as its nodes from the group's first
/// node back to it (`[a, b, a]`).
fn cycles<'a>(graph: &BTreeMap<&'a str, BTreeSet<&'a str>>) -> Vec<Vec<&'a str>> {
    let reach = |from: &'a str| -> BTreeSet<&'a str> {
        let (mut seen, mut todo) = (BTreeSet::new(), vec![from]);
        while let Some(n) = todo.pop() {
            for &m in graph.get(n).into_iter().flatten() {
                if seen.insert(m) {
                    todo.push(m);
                }
            }
        }
        seen
    };
    let reachable: BTreeMap<&str, BTreeSet<&str>> = graph.keys().map(|&n| (n, reach(n))).collect();
    let mut done = BTreeSet::new();
    let mut found = Vec::new();
    for (&n, from_n) in &reachable {
        if done.contains(n) || !from_n.contains(n) {
            continue;
        }
        let group: BTreeSet<&str> =
            from_n.iter().copied().filter(|m| reachable.get(m).is_some_and(|r| r.contains(n))).collect();
        done.extend(group.iter().copied());
        found.push(shortest_circle(graph, n, &group));
    }
    found
}

/// The shortest path from `start` back to it inside `group`, found breadth first.
fn shortest_circle<'a>(
    graph: &BTreeMap<&'a str, BTreeSet<&'a str>>,
    start: &'a str,
    group: &BTreeSet<&'a str>,
) -> Vec<&'a str> {
    let mut parent: BTreeMap<&str, &str> = BTreeMap::new();
    let mut queue = VecDeque::from([start]);
    while let Some(n) = queue.pop_front() {
        for &m in graph.get(n).into_iter().flatten().filter(|m| group.contains(*m)) {
            if m == start {
                let mut path = vec![n];
                while let Some(&p) = parent.get(path.last().expect("non-empty")) {
                    path.push(p);
                }
                path.reverse();
                path.push(start);
                return path;
            }
            if m != start && !parent.contains_key(m) {
                parent.insert(m, n);
                queue.push_back(m);
            }
        }
    }
    unreachable!("{start} is in a strongly connected group")
}

// ---------------------------------------------------------------------------------------------
// The checks can fail: each fed a small synthetic source that breaks its rule.

fn synthetic(path: &str, text: &str) -> Source {
    Source { path: path.to_owned(), module: module_of(path), text: text.to_owned(), test_only: false }
}

/// A function of `lines` lines (signature to closing brace), with a doc comment.
fn function_of(name: &str, lines: usize) -> String {
    let body = "    let _ = 1;\n".repeat(lines - 2);
    format!("/// Does it.\n#[inline]\npub fn {name}() {{\n{body}}}\n")
}

#[test]
fn check_reports_a_long_function() {
    let text = format!("//! A module.\n\n{}\n{}", function_of("short", 80), function_of("long", 81));
    let found = long_functions(&synthetic("src/a.rs", &text));
    assert_eq!(found, vec!["src/a.rs:88: long: 81 lines"]);
}

#[test]
fn check_reports_a_long_method_but_not_test_code_or_a_marked_one() {
    let method = function_of("run", 90).replace('\n', "\n    ");
    let text = format!(
        "struct S;\nimpl S {{\n    {method}\n}}\n\n// long: one table, read top to bottom\n{}\n#[cfg(test)]\nmod tests {{\n{}}}\n#[test]\n{}",
        function_of("marked", 90),
        function_of("in_tests", 90),
        function_of("a_test", 90),
    );
    let found = long_functions(&synthetic("src/a.rs", &text));
    assert_eq!(found, vec!["src/a.rs:5: S::run: 90 lines"]);
}

#[test]
fn check_reports_a_large_file() {
    assert_eq!(oversized("src/a.rs", &"x\n".repeat(700), 700), None);
    assert_eq!(oversized("src/a.rs", &"x\n".repeat(701), 700).as_deref(), Some("src/a.rs: 701 lines (limit 700)"));
}

#[test]
fn check_reports_an_arrow_back_up() {
    let lib = "pub mod a;\nmod b;\npub mod testkit;\n";
    let sources = [
        synthetic("src/a.rs", "use crate::b::B;\n"),
        synthetic("src/b.rs", "use crate::a::A;\nfn f() { crate::testkit::x(); }\n"),
        synthetic("src/testkit.rs", "use crate::{a::A, b::B};\n"),
        synthetic("src/lib.rs", lib),
    ];
    let imports: Vec<Import> = sources.iter().flat_map(imports).collect();
    let found = arrows_up(&module_order(lib), &imports);
    assert_eq!(
        found,
        vec!["src/a.rs:1: a imports b (listed after it)", "src/b.rs:2: b imports testkit (listed after it)"]
    );
}

#[test]
fn check_ignores_test_code_when_ordering() {
    let lib = "pub mod a;\nmod b;\n";
    let a = "#[cfg(test)]\nmod tests {\n    use crate::b::B;\n}\n#[test]\nfn t() { crate::b::f(); }\n\
             #[cfg(test)]\nuse crate::b::C;\n#[cfg(test)]\nstruct S(crate::b::D);\n";
    let found = arrows_up(&module_order(lib), &imports(&synthetic("src/a.rs", a)));
    assert!(found.is_empty(), "{found:?}");
}

#[test]
fn check_reports_a_circle_between_siblings() {
    let sources = [
        synthetic("src/x/mod.rs", "mod a;\nmod b;\nmod c;\n"),
        synthetic("src/x/a.rs", "use super::b::B;\n"),
        synthetic("src/x/b.rs", "fn f() { tracing::info!(\"{}\", crate::x::c::C); }\n"),
        synthetic("src/x/c.rs", "use super::{a::A, super::y::Y};\n"),
        synthetic("src/x/d.rs", "use super::a::A;\n"),
    ];
    let imports: Vec<Import> = sources.iter().flat_map(imports).collect();
    let folder = vec!["x".to_owned()];
    let found = sibling_cycles(&folder, &children(&folder, &sources), &imports);
    assert_eq!(found, vec!["src/x/: a → b → c → a (src/x/a.rs:1, src/x/b.rs:1, src/x/c.rs:1)"]);
}

#[test]
fn check_names_no_circle_in_a_layered_folder() {
    let sources = [
        synthetic("src/x/a.rs", "use super::b::B;\n"),
        synthetic("src/x/b.rs", "use super::c::C;\n"),
        synthetic("src/x/c.rs", ""),
    ];
    let imports: Vec<Import> = sources.iter().flat_map(imports).collect();
    let folder = vec!["x".to_owned()];
    assert!(sibling_cycles(&folder, &children(&folder, &sources), &imports).is_empty());
}
