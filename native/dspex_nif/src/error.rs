//! The one place core errors become Erlang terms: `{:error, kind}` or
//! `{:error, {kind, detail}}`, with `kind` an atom Elixir can match on.

use dspex_core::{Answer, Error};
use rustler::{Atom, Encoder, Env, Term};

use crate::atoms;
use crate::term::encode_value;

pub fn reason<'a>(env: Env<'a>, e: &Error) -> Term<'a> {
    let kind = Atom::from_str(env, e.kind())
        .map(|a| a.encode(env))
        .unwrap_or_else(|_| atoms::error().encode(env));
    match e.detail() {
        Some(d) => (kind, encode_value(env, &d)).encode(env),
        None => kind,
    }
}

pub fn error<'a>(env: Env<'a>, e: &Error) -> Term<'a> {
    (atoms::error(), reason(env, e)).encode(env)
}

/// `{:ok, value}` or the error tuple.
pub fn ok_or<'a, T: Encoder>(env: Env<'a>, r: Result<T, Error>) -> Term<'a> {
    match r {
        Ok(v) => (atoms::ok(), v).encode(env),
        Err(e) => error(env, &e),
    }
}

/// The term of a command's outcome: `:ok`, `{:ok, value}` or the error.
pub fn answer<'a>(env: Env<'a>, r: Result<Answer, Error>) -> Term<'a> {
    match r {
        Ok(Answer::Done) => atoms::ok().encode(env),
        Ok(Answer::Value(v)) => (atoms::ok(), encode_value(env, &v)).encode(env),
        Err(e) => error(env, &e),
    }
}

/// `:ok` or the error tuple.
pub fn unit_or<'a>(env: Env<'a>, r: Result<(), Error>) -> Term<'a> {
    match r {
        Ok(()) => atoms::ok().encode(env),
        Err(e) => error(env, &e),
    }
}
