//! Erlang term <-> `Value`. Decoding refuses what the engine cannot store
//! (pids, refs, funs, ports, improper lists, integers past 64 bits) and stops
//! early on oversized input: binaries are measured before they are copied,
//! and nesting is bounded, so a hostile term costs little and never overflows
//! the scheduler's stack.
//!
//! Encoding never creates an atom from data: `Value::Atom` names that the VM
//! does not already know are handed back as binaries (`existing_atom`).

use dspex_core::locks::{check_optimizer_id, LockClaim};
use dspex_core::value::MAX_DEPTH;
use dspex_core::{Caller, Error, Value};
use rustler::types::tuple::{get_tuple, make_tuple};
use rustler::{Atom, Binary, Encoder, Env, MapIterator, OwnedBinary, Term, TermType};

use crate::atoms;

/// Decodes a term whose heap footprint may be at most `budget` bytes.
pub fn decode_value(term: Term, budget: usize) -> Result<Value, Error> {
    let mut left = budget;
    decode(term, 0, &mut left, budget)
}

fn invalid(what: &str) -> Error {
    Error::InvalidValue(Value::atom(what))
}

fn charge(left: &mut usize, n: usize, budget: usize) -> Result<(), Error> {
    *left = left.checked_sub(n).ok_or(Error::TooLarge(budget))?;
    Ok(())
}

fn decode(term: Term, depth: usize, left: &mut usize, budget: usize) -> Result<Value, Error> {
    if depth > MAX_DEPTH {
        return Err(invalid("nested_too_deeply"));
    }
    let slot = std::mem::size_of::<Value>();
    match term.get_type() {
        TermType::Atom => {
            if is_nil(term) {
                return Ok(Value::Nil);
            }
            if let Ok(b) = term.decode::<bool>() {
                return Ok(Value::Bool(b));
            }
            let name = term.atom_to_string().map_err(|_| invalid("bad_atom"))?;
            charge(left, name.len(), budget)?;
            Ok(Value::Atom(name.into()))
        }
        TermType::Integer => term
            .decode::<i64>()
            .map(Value::Int)
            .map_err(|_| invalid("integer_out_of_range")),
        TermType::Float => term
            .decode::<f64>()
            .map(Value::Float)
            .map_err(|_| invalid("bad_float")),
        TermType::Binary => {
            let bin = Binary::from_term(term).map_err(|_| invalid("bitstring"))?;
            charge(left, bin.len(), budget)?;
            Ok(match std::str::from_utf8(bin.as_slice()) {
                Ok(s) => Value::Str(s.into()),
                Err(_) => Value::Bytes(bin.as_slice().into()),
            })
        }
        TermType::List => {
            let len = term.list_length().map_err(|_| invalid("improper_list"))?;
            charge(left, len.saturating_mul(slot), budget)?;
            let mut items = Vec::with_capacity(len);
            for item in term
                .into_list_iterator()
                .map_err(|_| invalid("improper_list"))?
            {
                items.push(decode(item, depth + 1, left, budget)?);
            }
            Ok(Value::List(items.into()))
        }
        TermType::Tuple => {
            let elems = get_tuple(term).map_err(|_| invalid("bad_tuple"))?;
            charge(left, elems.len().saturating_mul(slot), budget)?;
            let items = elems
                .into_iter()
                .map(|t| decode(t, depth + 1, left, budget))
                .collect::<Result<Vec<_>, _>>()?;
            Ok(Value::Tuple(items.into()))
        }
        TermType::Map => {
            let size = term.map_size().map_err(|_| invalid("bad_map"))?;
            if size == 0 {
                return Ok(Value::empty_map());
            }
            charge(left, size.saturating_mul(2 * slot), budget)?;
            let mut pairs = Vec::with_capacity(size);
            for (k, v) in MapIterator::new(term).ok_or_else(|| invalid("bad_map"))? {
                pairs.push((
                    decode(k, depth + 1, left, budget)?,
                    decode(v, depth + 1, left, budget)?,
                ));
            }
            Ok(Value::Map(pairs.into()))
        }
        _ => Err(invalid("unsupported_term")),
    }
}

/// Decodes a name, key or id: an atom (kept as an atom) or a UTF-8 binary.
pub fn decode_name(term: Term, max_bytes: usize) -> Result<Value, Error> {
    match decode_value(term, max_bytes) {
        Ok(v @ (Value::Atom(_) | Value::Str(_))) => Ok(v),
        Ok(Value::Nil | Value::Bool(_)) | Ok(_) => Err(Error::InvalidArgument(Value::atom(
            "name_must_be_atom_or_string",
        ))),
        Err(Error::TooLarge(_)) => Err(Error::InvalidArgument(Value::atom("bad_name_length"))),
        Err(e) => Err(e),
    }
}

/// The text of an identifier term (atom or binary) without building a
/// `Value`: the read path's lookup key.
pub fn ident_text<'a>(term: Term<'a>) -> Result<IdentText<'a>, Error> {
    if let Ok(bin) = Binary::from_term(term) {
        return std::str::from_utf8(bin.as_slice())
            .map(IdentText::Borrowed)
            .map_err(|_| Error::NotFound);
    }
    if term.is_atom() {
        if let Some(inline) = ascii_atom(term) {
            return Ok(inline);
        }
        return term
            .atom_to_string()
            .map(IdentText::Owned)
            .map_err(|_| Error::NotFound);
    }
    Err(Error::InvalidArgument(Value::atom(
        "name_must_be_atom_or_string",
    )))
}

/// Longest atom text kept on the stack; longer names take the slow path.
const INLINE_ATOM: usize = 64;

/// The text of a short ASCII atom, copied into a stack buffer: the read and
/// write paths name variables by atom, and this spares them an allocation.
/// `None` for long atoms and atoms with non-ASCII text (the caller falls
/// back to an owned string).
fn ascii_atom(term: Term) -> Option<IdentText<'static>> {
    let mut buf = [0u8; INLINE_ATOM];
    // SAFETY: `term` and its env are valid for the duration of this NIF
    // call; `enif_get_atom` writes at most `buf.len()` bytes (NUL included)
    // and returns 0 when the atom does not fit.
    let n = unsafe {
        rustler::sys::enif_get_atom(
            term.get_env().as_c_arg(),
            term.as_c_arg(),
            buf.as_mut_ptr(),
            buf.len() as u32,
            rustler::sys::ErlNifCharEncoding::ERL_NIF_LATIN1,
        )
    };
    let len = usize::try_from(n).ok()?.checked_sub(1)?;
    // Latin-1 above 0x7f is not UTF-8 text: leave those to the slow path.
    buf[..len]
        .is_ascii()
        .then_some(IdentText::Inline(buf, len as u8))
}

// On the stack on purpose: it lives for one NIF call and spares a heap
// allocation per atom-named read or write.
pub enum IdentText<'a> {
    Borrowed(&'a str),
    Owned(String),
    /// A short ASCII atom's text: the buffer and its length.
    Inline([u8; INLINE_ATOM], u8),
}

impl std::ops::Deref for IdentText<'_> {
    type Target = str;
    fn deref(&self) -> &str {
        match self {
            IdentText::Borrowed(s) => s,
            IdentText::Owned(s) => s,
            // SAFETY: `ascii_atom` builds `Inline` only after checking that
            // the first `len` bytes are ASCII, which is valid UTF-8.
            IdentText::Inline(buf, len) => unsafe {
                std::str::from_utf8_unchecked(&buf[..*len as usize])
            },
        }
    }
}

pub fn encode_value<'a>(env: Env<'a>, v: &Value) -> Term<'a> {
    match v {
        Value::Nil => atoms::nil().encode(env),
        Value::Bool(b) => b.encode(env),
        Value::Int(i) => i.encode(env),
        Value::Float(f) => f.encode(env),
        Value::Str(s) => s.encode(env),
        Value::Bytes(b) => bytes(env, b),
        Value::Atom(a) => match existing_atom(env, a) {
            Some(atom) => atom.encode(env),
            None => a.encode(env),
        },
        Value::List(xs) => xs
            .iter()
            .map(|x| encode_value(env, x))
            .collect::<Vec<_>>()
            .encode(env),
        Value::Tuple(xs) => {
            let terms: Vec<Term> = xs.iter().map(|x| encode_value(env, x)).collect();
            make_tuple(env, &terms)
        }
        Value::Map(pairs) => {
            let keys: Vec<Term> = pairs.iter().map(|(k, _)| encode_value(env, k)).collect();
            let vals: Vec<Term> = pairs.iter().map(|(_, v)| encode_value(env, v)).collect();
            Term::map_from_term_arrays(env, &keys, &vals).unwrap_or_else(|_| {
                // Equal keys (a snapshot may hold a map the VM never made):
                // the last one wins, as in a map literal.
                keys.iter()
                    .zip(&vals)
                    .fold(Term::map_new(env), |m, (&k, &v)| {
                        m.map_put(k, v).unwrap_or(m)
                    })
            })
        }
    }
}

/// The atom named `name` if the VM already has it. Atoms are never
/// collected, so the engine creates none from data: a name that is not yet
/// an atom goes back as a binary (its vocabulary is created at load, see
/// `atoms::load`). Atom text is Latin-1 in the VM (NIF 2.15), as
/// `atom_to_string` reads it.
pub fn existing_atom(env: Env, name: &str) -> Option<Atom> {
    let mut latin1 = [0u8; 255];
    let mut n = 0;
    for c in name.chars() {
        let byte = u8::try_from(u32::from(c)).ok()?;
        *latin1.get_mut(n)? = byte;
        n += 1;
    }
    Atom::try_from_bytes(env, &latin1[..n]).ok().flatten()
}

pub fn bytes<'a>(env: Env<'a>, b: &[u8]) -> Term<'a> {
    match OwnedBinary::new(b.len()) {
        Some(mut owned) => {
            owned.as_mut_slice().copy_from_slice(b);
            owned.release(env).encode(env)
        }
        None => atoms::error().encode(env),
    }
}

pub fn is_nil(term: Term) -> bool {
    // Atoms are immediates: the same atom is the same word, so comparing
    // the raw terms needs no call into the VM.
    term.as_c_arg() == atoms::nil().to_term(term.get_env()).as_c_arg()
}

/// `nil` or a non-negative integer.
pub fn decode_opt_u64(term: Term) -> Result<Option<u64>, Error> {
    if is_nil(term) {
        return Ok(None);
    }
    term.decode::<u64>()
        .map(Some)
        .map_err(|_| Error::InvalidArgument(Value::atom("expected_non_negative_integer")))
}

/// `nil` or a binary principal of at most 255 bytes.
pub fn decode_principal<'a>(term: Term<'a>) -> Result<Option<&'a str>, Error> {
    if is_nil(term) {
        return Ok(None);
    }
    let bin = Binary::from_term(term).map_err(|_| Error::invalid_arg("bad_principal"))?;
    match std::str::from_utf8(bin.as_slice()) {
        Ok(p) if !p.is_empty() && p.len() <= MAX_PRINCIPAL_BYTES => Ok(Some(p)),
        _ => Err(Error::invalid_arg("bad_principal")),
    }
}

/// Longest principal (a session id) accepted.
pub const MAX_PRINCIPAL_BYTES: usize = 255;
/// Heap bytes of a caller's context map, compared against rule conditions.
pub const MAX_CONTEXT_BYTES: usize = 64 * 1024;

/// A decoded caller term; [`CallerTerm::caller`] borrows it as a `Caller`.
pub struct CallerTerm<'a> {
    pub principal: Option<&'a str>,
    pub context: Option<Value>,
    pub lock: LockClaim<'a>,
}

impl CallerTerm<'_> {
    /// The caller of a call stamped `now_us`.
    pub fn caller(&self, now_us: i64) -> Caller<'_> {
        Caller {
            principal: self.principal,
            context: self.context.as_ref(),
            lock: self.lock,
            now_us,
        }
    }
}

/// Who a variable operation is for: `nil` (the session itself), a binary
/// principal, `{principal, context_map}` (access-rule conditions),
/// `{principal, lock_token, optimizer_id}` (a write under an optimizer lock),
/// or `{principal, context_map, lock_token, optimizer_id}`; any element but
/// the tuple's shape may be `nil`.
pub fn decode_caller<'a>(term: Term<'a>) -> Result<CallerTerm<'a>, Error> {
    let parts = match get_tuple(term) {
        Ok(parts) => parts,
        Err(_) => {
            return Ok(CallerTerm {
                principal: decode_principal(term)?,
                context: None,
                lock: LockClaim::default(),
            })
        }
    };
    let (principal, context, token, optimizer) = match parts[..] {
        [p, c] => (p, Some(c), None, None),
        [p, t, o] => (p, None, Some(t), Some(o)),
        [p, c, t, o] => (p, Some(c), Some(t), Some(o)),
        _ => return Err(Error::invalid_arg("bad_caller")),
    };
    Ok(CallerTerm {
        principal: decode_principal(principal)?,
        context: match context {
            Some(c) if !is_nil(c) => Some(decode_context(c)?),
            _ => None,
        },
        lock: LockClaim {
            token: match token {
                Some(t) => decode_opt_u64(t).map_err(|_| Error::invalid_arg("bad_lock_token"))?,
                None => None,
            },
            optimizer: match optimizer {
                Some(o) if !is_nil(o) => Some(decode_optimizer(o)?),
                _ => None,
            },
        },
    })
}

fn decode_context(term: Term) -> Result<Value, Error> {
    match decode_value(term, MAX_CONTEXT_BYTES) {
        Ok(map @ Value::Map(_)) => Ok(map),
        Ok(_) => Err(Error::invalid_arg("context_must_be_a_map")),
        Err(Error::TooLarge(n)) => Err(Error::TooLarge(n)),
        Err(_) => Err(Error::invalid_arg("bad_context")),
    }
}

/// An optimizer id: a UTF-8 binary the core's rule accepts
/// ([`check_optimizer_id`]); atoms are converted in Elixir.
pub fn decode_optimizer<'a>(term: Term<'a>) -> Result<&'a str, Error> {
    let bin = Binary::from_term(term).map_err(|_| Error::invalid_arg("bad_optimizer_id"))?;
    let text =
        std::str::from_utf8(bin.as_slice()).map_err(|_| Error::invalid_arg("bad_optimizer_id"))?;
    check_optimizer_id(text)
}

/// A session id: a non-empty UTF-8 binary.
pub fn decode_sid<'a>(term: Term<'a>) -> Result<&'a str, Error> {
    let bin = Binary::from_term(term).map_err(|_| Error::invalid_arg("bad_session_id"))?;
    std::str::from_utf8(bin.as_slice()).map_err(|_| Error::invalid_arg("bad_session_id"))
}
