//! Reply maps, encoded straight into terms from the core's shapes
//! (`dspex_core::command::reply`): the keys and fields are the core's, the
//! key atoms are made once per shape, so the NIF and the port return the
//! same maps and the NIF builds no intermediate `Value`.

use std::sync::OnceLock;

use dspex_core::command::reply::{Field, AUDIT_KEYS, HISTORY_KEYS, SESSION_KEYS, VARIABLE_KEYS};
use rustler::{Atom, Encoder, Env, Term};

use crate::atoms;
use crate::term::encode_value;

/// The key atoms of one shape, made on first use (atoms live as long as
/// the VM, so they may be kept).
pub struct Keys<const N: usize> {
    names: &'static [&'static str; N],
    atoms: OnceLock<[Atom; N]>,
}

impl<const N: usize> Keys<N> {
    const fn new(names: &'static [&'static str; N]) -> Self {
        Keys {
            names,
            atoms: OnceLock::new(),
        }
    }

    fn get(&self, env: Env) -> &[Atom; N] {
        self.atoms.get_or_init(|| {
            self.names
                .map(|k| Atom::from_str(env, k).unwrap_or_else(|_| atoms::nil()))
        })
    }

    /// The map of `fields`, in the shape's key order.
    pub fn encode<'a>(&self, env: Env<'a>, fields: &[Field; N]) -> Term<'a> {
        let keys: [Term; N] = self.get(env).map(|a| a.encode(env));
        let vals: [Term; N] = std::array::from_fn(|i| encode_field(env, &fields[i]));
        Term::map_from_term_arrays(env, &keys, &vals).unwrap_or_else(|_| Term::map_new(env))
    }
}

pub static VARIABLE: Keys<12> = Keys::new(&VARIABLE_KEYS);
pub static HISTORY: Keys<4> = Keys::new(&HISTORY_KEYS);
pub static SESSION: Keys<9> = Keys::new(&SESSION_KEYS);
pub static AUDIT: Keys<6> = Keys::new(&AUDIT_KEYS);

fn encode_field<'a>(env: Env<'a>, f: &Field) -> Term<'a> {
    match f {
        Field::Nil => atoms::nil().encode(env),
        Field::Int(n) => n.encode(env),
        Field::Count(n) => i64::try_from(*n).unwrap_or(i64::MAX).encode(env),
        Field::Atom(a) => Atom::from_str(env, a)
            .map(|a| a.encode(env))
            .unwrap_or_else(|_| atoms::nil().encode(env)),
        Field::Str(s) => s.encode(env),
        Field::Value(v) => encode_value(env, v),
        Field::Owned(v) => encode_value(env, v),
    }
}
