//! Small composable CRDTs. Every type here has a `merge` that is commutative, associative and
//! idempotent, so replicas that see the same set of updates in any order end up equal.

use serde::{Deserialize, Serialize};

use super::hlc::Hlc;

/// Identifies a node of the mesh (the textual form of its libp2p peer id).
pub type NodeId = String;

/// When and by whom a value was written; totally ordered, so "last writer wins" is well defined.
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
pub struct Stamp {
    /// Hybrid logical time of the write.
    pub at: Hlc,
    /// The node that wrote it (breaks ties between equal times).
    pub by: NodeId,
}

/// A CRDT: a value that can absorb another replica's value of the same key.
pub trait Crdt {
    /// Merge `other` into `self`; returns whether `self` changed.
    fn merge(&mut self, other: &Self) -> bool;
}

/// A last-writer-wins register.
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
pub struct Lww<T> {
    /// Who wrote the value, and when.
    pub stamp: Stamp,
    /// The value.
    pub value: T,
}

impl<T> Lww<T> {
    /// A register holding `value` written at `stamp`.
    pub fn new(stamp: Stamp, value: T) -> Self {
        Self { stamp, value }
    }
}

impl<T: Ord + Clone> Crdt for Lww<T> {
    fn merge(&mut self, other: &Self) -> bool {
        // Equal stamps only happen if a writer reused a stamp; order by value so the result
        // is still independent of arrival order.
        if (&other.stamp, &other.value) > (&self.stamp, &self.value) {
            *self = other.clone();
            true
        } else {
            false
        }
    }
}

impl<T: Crdt + Clone> Crdt for Option<T> {
    fn merge(&mut self, other: &Self) -> bool {
        match (self.as_mut(), other) {
            (_, None) => false,
            (None, Some(theirs)) => {
                *self = Some(theirs.clone());
                true
            }
            (Some(mine), Some(theirs)) => mine.merge(theirs),
        }
    }
}

/// A register that keeps the largest value ever written (a join-semilattice on `Ord`).
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
pub struct MaxReg<T>(pub T);

impl<T: Ord + Clone> Crdt for MaxReg<T> {
    fn merge(&mut self, other: &Self) -> bool {
        if other.0 > self.0 {
            self.0 = other.0.clone();
            true
        } else {
            false
        }
    }
}

#[cfg(test)]
pub(crate) mod laws {
    //! Reusable property checks for the CRDT laws.
    use super::Crdt;

    /// `a ⊔ b == b ⊔ a`
    pub fn commutative<T: Crdt + Clone + PartialEq + std::fmt::Debug>(a: &T, b: &T) {
        let mut ab = a.clone();
        ab.merge(b);
        let mut ba = b.clone();
        ba.merge(a);
        assert_eq!(ab, ba);
    }

    /// `(a ⊔ b) ⊔ c == a ⊔ (b ⊔ c)`
    pub fn associative<T: Crdt + Clone + PartialEq + std::fmt::Debug>(a: &T, b: &T, c: &T) {
        let mut left = a.clone();
        left.merge(b);
        left.merge(c);
        let mut bc = b.clone();
        bc.merge(c);
        let mut right = a.clone();
        right.merge(&bc);
        assert_eq!(left, right);
    }

    /// `a ⊔ a == a`, and merging reports no change then.
    pub fn idempotent<T: Crdt + Clone + PartialEq + std::fmt::Debug>(a: &T) {
        let mut aa = a.clone();
        assert!(!aa.merge(a));
        assert_eq!(&aa, a);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn stamp() -> impl Strategy<Value = Stamp> {
        (0u64..5, 0u32..3, "[ab]").prop_map(|(wall_ms, logical, by)| Stamp {
            at: Hlc { wall_ms, logical },
            by,
        })
    }

    fn lww() -> impl Strategy<Value = Lww<u8>> {
        (stamp(), 0u8..4).prop_map(|(stamp, value)| Lww::new(stamp, value))
    }

    proptest! {
        #[test]
        fn lww_obeys_the_merge_laws(a in lww(), b in lww(), c in lww()) {
            laws::commutative(&a, &b);
            laws::associative(&a, &b, &c);
            laws::idempotent(&a);
        }

        #[test]
        fn optional_lww_obeys_the_merge_laws(
            a in proptest::option::of(lww()),
            b in proptest::option::of(lww()),
            c in proptest::option::of(lww()),
        ) {
            laws::commutative(&a, &b);
            laws::associative(&a, &b, &c);
            laws::idempotent(&a);
        }

        #[test]
        fn max_register_obeys_the_merge_laws(a in 0u8..9, b in 0u8..9, c in 0u8..9) {
            laws::commutative(&MaxReg(a), &MaxReg(b));
            laws::associative(&MaxReg(a), &MaxReg(b), &MaxReg(c));
            laws::idempotent(&MaxReg(a));
        }
    }

    #[test]
    fn later_write_wins() {
        let early = Lww::new(
            Stamp {
                at: Hlc {
                    wall_ms: 1,
                    logical: 0,
                },
                by: "b".into(),
            },
            10,
        );
        let late = Lww::new(
            Stamp {
                at: Hlc {
                    wall_ms: 2,
                    logical: 0,
                },
                by: "a".into(),
            },
            20,
        );
        let mut reg = late.clone();
        assert!(!reg.merge(&early));
        assert_eq!(reg.value, 20);
        let mut reg = early;
        assert!(reg.merge(&late));
        assert_eq!(reg.value, 20);
    }
}
