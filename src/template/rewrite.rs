//! Source rewrites made with minijinja's own parser, so positions are exact.
//!
//! * Every `a % b` becomes `_chatmask_percent(a, b, kind)`: Python's `%` (string formatting
//!   and Python's modulo), which minijinja lacks for strings; `kind` records whether the
//!   right-hand side was written as a list literal (1 argument, and a "mapping" to Python).
//!
//! * In a template that uses `|safe`, every `a + b` becomes `_chatmask_add(a, b)` and every
//!   `a ~ b` `_chatmask_concat(a, b)`: Jinja2's Markup semantics (see `pyvalues.rs`).
//!
//! * Every `x.items` (a dict method's name read without a call) becomes
//!   `_chatmask_attr(x, 'items')`: Jinja2 finds the method before the key.
//!
//! * Every for-loop's iterable goes through `_chatmask_iterable`, which raises on None as
//!   Jinja2 does.
//!
//! A rewrite that does not parse is dropped (the source is compiled as it was), so the
//! template's own syntax errors are reported by the compiler, unchanged.

use minijinja::machinery::ast::{BinOpKind, CallArg, Expr, Stmt};

/// The leftmost byte an expression covers (a filter's own span starts at the filter's name).
pub fn start(e: &Expr<'_>) -> u32 {
    let inner = match e {
        Expr::Filter(f) => f.expr.as_ref().map(start),
        Expr::Test(t) => Some(start(&t.expr)),
        Expr::GetAttr(g) => Some(start(&g.expr)),
        Expr::GetItem(g) => Some(start(&g.expr)),
        Expr::Call(c) => Some(start(&c.expr)),
        Expr::Slice(s) => Some(start(&s.expr)),
        Expr::BinOp(b) => Some(start(&b.left)),
        Expr::Compare(c) => Some(start(&c.expr)),
        // An if-expression's own span starts at the token before it (a `(` around it, say).
        Expr::IfExpr(i) => return start(&i.true_expr),
        Expr::Tuple(t) => t.items.first().map(start),
        _ => None,
    };
    inner.map_or(e.span().start_offset, |s| s.min(e.span().start_offset))
}

/// The byte after an expression; a tuple without parentheses (`{% set a, b = 1, 2 %}`) has a
/// span that stops short of its last items.
fn end(e: &Expr<'_>) -> u32 {
    match e {
        Expr::Tuple(t) => t
            .items
            .iter()
            .map(end)
            .max()
            .map_or(e.span().end_offset, |x| x.max(e.span().end_offset)),
        _ => e.span().end_offset,
    }
}

/// What an operator found in the source becomes.
#[derive(Debug, Clone, Copy, PartialEq)]
enum Kind<'a> {
    /// `%`, with how the right side was written (0 other, 1 tuple, 2 list literal).
    Percent(u8),
    Add,
    Concat,
    /// A method name read as an attribute; `right` is unused.
    Attr(&'a str),
}

/// One operator found in the source: byte ranges and what it becomes.
#[derive(Debug, Clone, Copy)]
struct Percent<'a> {
    whole: (usize, usize),
    left: (usize, usize),
    right: (usize, usize),
    kind: Kind<'a>,
}

/// The operators found, and whether the template uses `|safe` (only then are `+` and `~`
/// rewritten: a function call costs more than the operator).
#[derive(Default)]
struct Found<'a> {
    ops: Vec<Percent<'a>>,
    saw_safe: bool,
}

impl Percent<'_> {
    /// The text replaced: the operator's span, parentheses around either operand included.
    fn range(&self) -> (usize, usize) {
        self.whole
    }
}

fn visit_args<'a>(args: &[CallArg<'a>], out: &mut Found<'a>) {
    for arg in args {
        match arg {
            CallArg::Pos(e)
            | CallArg::Kwarg(_, e)
            | CallArg::PosSplat(e)
            | CallArg::KwargSplat(e) => visit_expr(e, out),
        }
    }
}

fn visit_expr<'a>(e: &Expr<'a>, out: &mut Found<'a>) {
    match e {
        Expr::Var(_) | Expr::Const(_) => {}
        Expr::Slice(s) => {
            visit_expr(&s.expr, out);
            for part in [&s.start, &s.stop, &s.step].into_iter().flatten() {
                visit_expr(part, out);
            }
        }
        Expr::UnaryOp(u) => visit_expr(&u.expr, out),
        Expr::BinOp(b) => {
            let kind = match b.op {
                BinOpKind::Rem => Some(Kind::Percent(match &b.right {
                    Expr::List(_) => 2,
                    Expr::Tuple(_) => 1,
                    _ => 0,
                })),
                BinOpKind::Add => Some(Kind::Add),
                BinOpKind::Concat => Some(Kind::Concat),
                _ => None,
            };
            if let Some(kind) = kind {
                let (l, r) = (start(&b.left) as usize, end(&b.right) as usize);
                out.ops.push(Percent {
                    whole: (
                        l.min(e.span().start_offset as usize),
                        r.max(e.span().end_offset as usize),
                    ),
                    left: (start(&b.left) as usize, end(&b.left) as usize),
                    right: (start(&b.right) as usize, end(&b.right) as usize),
                    kind,
                });
            }
            visit_expr(&b.left, out);
            visit_expr(&b.right, out);
        }
        Expr::Compare(c) => {
            visit_expr(&c.expr, out);
            for op in &c.ops {
                visit_expr(&op.expr, out);
            }
        }
        Expr::IfExpr(i) => {
            visit_expr(&i.test_expr, out);
            visit_expr(&i.true_expr, out);
            if let Some(f) = &i.false_expr {
                visit_expr(f, out);
            }
        }
        Expr::Filter(f) => {
            out.saw_safe |= f.name == "safe";
            if let Some(x) = &f.expr {
                visit_expr(x, out);
            }
            visit_args(&f.args, out);
        }
        Expr::Test(t) => {
            visit_expr(&t.expr, out);
            visit_args(&t.args, out);
        }
        Expr::GetAttr(g) => {
            if super::pyvalues::is_method_name(g.name) {
                let whole = (start(e) as usize, end(e) as usize);
                let left = (start(&g.expr) as usize, end(&g.expr) as usize);
                out.ops.push(Percent {
                    whole,
                    left,
                    right: whole,
                    kind: Kind::Attr(g.name),
                });
            }
            visit_expr(&g.expr, out)
        }
        Expr::GetItem(g) => {
            visit_expr(&g.expr, out);
            visit_expr(&g.subscript_expr, out);
        }
        Expr::Call(c) => {
            match &c.expr {
                // `x.items()`: a method call, the same in both.
                Expr::GetAttr(g) => visit_expr(&g.expr, out),
                callee => visit_expr(callee, out),
            }
            visit_args(&c.args, out);
        }
        Expr::List(l) => l.items.iter().for_each(|x| visit_expr(x, out)),
        Expr::Tuple(t) => t.items.iter().for_each(|x| visit_expr(x, out)),
        Expr::Map(m) => m
            .keys
            .iter()
            .chain(m.values.iter())
            .for_each(|x| visit_expr(x, out)),
    }
}

fn visit_stmts<'a>(stmts: &[Stmt<'a>], out: &mut Found<'a>) {
    for stmt in stmts {
        match stmt {
            Stmt::Template(t) => visit_stmts(&t.children, out),
            Stmt::EmitExpr(e) => visit_expr(&e.expr, out),
            Stmt::EmitRaw(_) => {}
            Stmt::ForLoop(f) => {
                visit_expr(&f.iter, out);
                if let Some(x) = &f.filter_expr {
                    visit_expr(x, out);
                }
                visit_stmts(&f.body, out);
                visit_stmts(&f.else_body, out);
            }
            Stmt::IfCond(c) => {
                visit_expr(&c.expr, out);
                visit_stmts(&c.true_body, out);
                visit_stmts(&c.false_body, out);
            }
            Stmt::WithBlock(w) => {
                for (_, value) in &w.assignments {
                    visit_expr(value, out);
                }
                visit_stmts(&w.body, out);
            }
            Stmt::Set(s) => visit_expr(&s.expr, out),
            Stmt::SetBlock(b) => {
                if let Some(x) = &b.filter {
                    visit_expr(x, out);
                }
                visit_stmts(&b.body, out);
            }
            Stmt::AutoEscape(a) => {
                visit_expr(&a.enabled, out);
                visit_stmts(&a.body, out);
            }
            Stmt::FilterBlock(b) => {
                visit_expr(&b.filter, out);
                visit_stmts(&b.body, out);
            }
            Stmt::Macro(m) => {
                m.defaults.iter().for_each(|x| visit_expr(x, out));
                visit_stmts(&m.body, out);
            }
            Stmt::CallBlock(c) => {
                visit_expr(&c.call.expr, out);
                visit_args(&c.call.args, out);
                c.macro_decl
                    .defaults
                    .iter()
                    .for_each(|x| visit_expr(x, out));
                visit_stmts(&c.macro_decl.body, out);
            }
            Stmt::Do(d) => {
                visit_expr(&d.call.expr, out);
                visit_args(&d.call.args, out);
            }
            _ => {}
        }
    }
}

/// Writes `range` of `source` with every operator in it (outermost first) turned into a call.
fn emit(source: &str, range: (usize, usize), found: &[Percent], out: &mut String) -> Option<()> {
    let mut pos = range.0;
    for p in found {
        let (s, e) = p.range();
        if s < pos || e > range.1 {
            continue; // nested inside one already written, or outside this range
        }
        out.push_str(source.get(pos..s)?);
        out.push_str(match p.kind {
            Kind::Percent(_) => "_chatmask_percent(",
            Kind::Add => "_chatmask_add(",
            Kind::Concat => "_chatmask_concat(",
            Kind::Attr(_) => "_chatmask_attr(",
        });
        emit(source, p.left, found, out)?;
        match p.kind {
            Kind::Attr(name) => {
                out.push_str(", '");
                out.push_str(name); // an identifier: no quoting needed
                out.push_str("')");
            }
            kind => {
                out.push_str(", ");
                emit(source, p.right, found, out)?;
                out.push_str(match kind {
                    Kind::Percent(1) => ", 1)",
                    Kind::Percent(2) => ", 2)",
                    Kind::Percent(_) => ", 0)",
                    _ => ")",
                });
            }
        }
        pos = e;
    }
    out.push_str(source.get(pos..range.1)?);
    Some(())
}

/// `source` with Python's `%`, Markup's `+` and method attributes made explicit (see the
/// module doc); unchanged if it has none.
pub fn python_operators(source: &str, syntax: minijinja::syntax::SyntaxConfig) -> String {
    let Ok(ast) = minijinja::machinery::parse(source, super::TEMPLATE_NAME, syntax.clone()) else {
        return source.to_string();
    };
    let mut found = Found::default();
    visit_stmts(std::slice::from_ref(&ast), &mut found);
    let saw_safe = found.saw_safe;
    let mut found = found.ops;
    found.retain(|p| saw_safe || !matches!(p.kind, Kind::Add | Kind::Concat));
    if found.is_empty() {
        return source.to_string();
    }
    // Outermost first: by start, then the longest.
    found.sort_by(|a, b| {
        a.range()
            .0
            .cmp(&b.range().0)
            .then(b.range().1.cmp(&a.range().1))
    });
    let mut out = String::with_capacity(source.len() + found.len() * 24);
    if emit(source, (0, source.len()), &found, &mut out).is_none()
        || minijinja::machinery::parse(&out, super::TEMPLATE_NAME, syntax).is_err()
    {
        return source.to_string();
    }
    out
}

/// Two guards wrapped around expressions, positioned by minijinja's own parser (a source that
/// does not parse is left for the compiler to report):
///
/// * Jinja2 raises `TypeError: 'NoneType' object is not iterable` for `{% for x in none %}`;
///   minijinja iterates None as empty, and has no hook for it. Tool-use templates that loop over
///   `tools` without a guard depend on that error, so every for-loop's iterable is routed
///   through `_chatmask_iterable`, which raises on None.
/// * A string can only outgrow the output limit by being assigned back and grown again (a
///   doubling `{% set ns.s = ns.s ~ ns.s %}`); minijinja's fuel would let it reach ~640 MB
///   first. Every `{% set %}` value goes through `_chatmask_sized`, which refuses a string over
///   the limit, so the doubling stops one step past it.
pub fn guard_none_iteration(source: &str) -> String {
    use minijinja::machinery::ast::Stmt;
    const ITERABLE: &str = ")|_chatmask_iterable";
    const SIZED: &str = ")|_chatmask_sized";
    fn walk(stmts: &[Stmt<'_>], out: &mut Vec<(usize, usize, &'static str)>) {
        for stmt in stmts {
            match stmt {
                Stmt::Template(t) => walk(&t.children, out),
                Stmt::ForLoop(f) => {
                    out.push((start(&f.iter) as usize, end(&f.iter) as usize, ITERABLE));
                    walk(&f.body, out);
                    walk(&f.else_body, out);
                }
                Stmt::Set(s) => out.push((start(&s.expr) as usize, end(&s.expr) as usize, SIZED)),
                Stmt::IfCond(c) => {
                    walk(&c.true_body, out);
                    walk(&c.false_body, out);
                }
                Stmt::WithBlock(w) => walk(&w.body, out),
                Stmt::SetBlock(b) => walk(&b.body, out),
                Stmt::AutoEscape(a) => walk(&a.body, out),
                Stmt::FilterBlock(b) => walk(&b.body, out),
                Stmt::Block(b) => walk(&b.body, out),
                Stmt::Macro(m) => walk(&m.body, out),
                Stmt::CallBlock(c) => walk(&c.macro_decl.body, out),
                _ => {}
            }
        }
    }
    let Ok(ast) = minijinja::machinery::parse(source, super::TEMPLATE_NAME, super::syntax_config())
    else {
        return source.to_string();
    };
    let mut wrapped = Vec::new();
    walk(std::slice::from_ref(&ast), &mut wrapped);
    if wrapped.is_empty() {
        return source.to_string();
    }
    wrapped.sort_unstable();
    let mut out = String::with_capacity(source.len() + wrapped.len() * 24);
    let mut pos = 0;
    for (start, end, suffix) in wrapped {
        let (Some(head), Some(expr)) = (source.get(pos..start), source.get(start..end)) else {
            return source.to_string(); // spans that do not nest cleanly: leave the source as is
        };
        out.push_str(head);
        out.push('(');
        out.push_str(expr);
        out.push_str(suffix);
        pos = end;
    }
    out.push_str(&source[pos..]);
    // Belt and braces: a rewrite that does not parse is dropped rather than reported as the
    // template's error.
    if minijinja::machinery::parse(&out, super::TEMPLATE_NAME, super::syntax_config()).is_err() {
        return source.to_string();
    }
    out
}
