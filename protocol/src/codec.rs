//! How typed values become frame bytes: the two traits and the table macros behind
//! [`crate::frame`].
//!
//! A frame body is a fixed *head* (parsed in place with `zerocopy`: no copy, no allocation)
//! followed, for some kinds, by a variable *rest* that runs to the end of the frame and is
//! handed out as a [`Bytes`] slice of the receive buffer. The traits say which types can sit
//! where:
//!
//! * [`Field`]: a fixed-size value with a wire layout (`u64` as `U64`, a [`crate::DeviceAddr`]
//!   as its 10 bytes, ...). A struct whose fields are all [`Field`]s is itself a [`Field`].
//! * [`Body`]: a head and an optional rest. Every [`Field`] is a [`Body`] with no rest; the
//!   types that may end a frame (`Bytes`, the `Ack` sequence list, the `Error` text, a
//!   [`crate::Message`]) are [`Body`]s with a rest.
//!
//! [`wire_struct!`] declares a struct once and derives both its head layout and the
//! conversions, so adding a field to a frame is one line in the table (`frame.rs`).
//!
//! In the manner of rustls `msgs/codec.rs` and `msgs/macros.rs`: encode and decode live beside
//! the type, one table per family.

use bytes::Bytes;
use zerocopy::byteorder::big_endian::{U16, U32, U64};
use zerocopy::{FromBytes, Immutable, IntoBytes, KnownLayout, Unaligned};

/// What a fixed wire layout must be: any byte pattern is a value (so parsing in place cannot
/// fail once the length is right), no padding, no alignment.
pub(crate) trait Layout:
    FromBytes + IntoBytes + KnownLayout + Immutable + Unaligned
{
}
impl<T: FromBytes + IntoBytes + KnownLayout + Immutable + Unaligned> Layout for T {}

/// The name of a field whose wire value is outside its domain (it becomes
/// `DecodeError::InvalidField { field, .. }`).
pub(crate) type Invalid = &'static str;

/// A fixed-size value with a big-endian, unpadded wire layout.
pub(crate) trait Field: Sized {
    /// The value's bytes, parsed in place.
    type Wire: Layout;
    /// The wire form.
    fn to_wire(&self) -> Self::Wire;
    /// Back from the wire form; `Err(field)` when the bytes are not a value of this type.
    fn from_wire(wire: &Self::Wire) -> Result<Self, Invalid>;
}

/// Why a [`Body`] refused its bytes. The frame layer adds the kind byte.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum BodyError {
    /// This many bytes are left over (the rest is not a whole number of items, or longer than
    /// its limit).
    Trailing(usize),
    /// A field's value is outside its domain.
    Invalid(Invalid),
}

/// A fixed head and, when [`Body::HAS_REST`], a variable rest to the end of the frame.
pub(crate) trait Body: Sized {
    /// The fixed part.
    type Head: Layout;
    /// Whether a rest follows the head. When false, bytes after the head are refused
    /// (`DecodeError::Trailing`).
    const HAS_REST: bool;
    /// The fixed part's wire form.
    fn head(&self) -> Self::Head;
    /// Bytes [`Body::put_rest`] appends.
    fn rest_len(&self) -> usize;
    /// Appends the rest.
    fn put_rest(&self, out: &mut Vec<u8>);
    /// Builds the value from its head and the rest (a slice of the receive buffer; empty when
    /// there is no rest).
    fn decode(head: &Self::Head, rest: Bytes) -> Result<Self, BodyError>;
}

impl<T: Field> Body for T {
    type Head = T::Wire;
    const HAS_REST: bool = false;
    fn head(&self) -> T::Wire {
        self.to_wire()
    }
    fn rest_len(&self) -> usize {
        0
    }
    fn put_rest(&self, _out: &mut Vec<u8>) {}
    fn decode(head: &T::Wire, _rest: Bytes) -> Result<Self, BodyError> {
        T::from_wire(head).map_err(BodyError::Invalid)
    }
}

/// Bytes `T`'s head takes on the wire.
pub(crate) const fn head_bytes<T: Body>() -> usize {
    std::mem::size_of::<T::Head>()
}

impl Field for u8 {
    type Wire = u8;
    fn to_wire(&self) -> u8 {
        *self
    }
    fn from_wire(wire: &u8) -> Result<Self, Invalid> {
        Ok(*wire)
    }
}

macro_rules! big_endian_field {
    ($($ty:ty => $wire:ty),* $(,)?) => {$(
        impl Field for $ty {
            type Wire = $wire;
            fn to_wire(&self) -> $wire {
                <$wire>::new(*self)
            }
            fn from_wire(wire: &$wire) -> Result<Self, Invalid> {
                Ok(wire.get())
            }
        }
    )*};
}

big_endian_field!(u16 => U16, u32 => U32, u64 => U64);

impl<const N: usize> Field for [u8; N] {
    type Wire = [u8; N];
    fn to_wire(&self) -> [u8; N] {
        *self
    }
    fn from_wire(wire: &[u8; N]) -> Result<Self, Invalid> {
        Ok(*wire)
    }
}

/// Boxed values (large keys kept out of the `Frame` enum) have the layout of the value.
impl<T: Field> Field for Box<T> {
    type Wire = T::Wire;
    fn to_wire(&self) -> T::Wire {
        T::to_wire(self)
    }
    fn from_wire(wire: &T::Wire) -> Result<Self, Invalid> {
        T::from_wire(wire).map(Box::new)
    }
}

/// An opaque payload: no head, the rest is the bytes themselves (a slice of the receive
/// buffer, never copied on decode).
impl Body for Bytes {
    type Head = ();
    const HAS_REST: bool = true;
    fn head(&self) {}
    fn rest_len(&self) -> usize {
        self.len()
    }
    fn put_rest(&self, out: &mut Vec<u8>) {
        out.extend_from_slice(self);
    }
    fn decode(_head: &(), rest: Bytes) -> Result<Self, BodyError> {
        Ok(rest)
    }
}

/// Declares a wire struct once: the public struct, its head layout and the conversions.
///
/// ```text
/// wire_struct! {
///     /// Doc (with the byte layout).
///     #[derive(Clone, Debug, PartialEq, Eq)]
///     pub struct Name {
///         /// Doc.
///         field: FieldType,        // a `Field`: part of the fixed head, in this order
///         ..                       // optional: the last field is a `Body` with a rest
///         /// Doc.
///         rest_field: BodyType,
///     }
/// }
/// ```
///
/// Every field is `pub`. Without `..` the struct is a [`Field`] (and so a [`Body`] with no
/// rest); with it, a [`Body`] whose head is the fields' wire forms followed by the last
/// field's head, and whose rest is the last field's rest.
macro_rules! wire_struct {
    (
        $(#[$meta:meta])*
        pub struct $name:ident {
            $( $(#[$fmeta:meta])* $field:ident : $ty:ty, )*
        }
    ) => {
        $(#[$meta])*
        pub struct $name {
            $( $(#[$fmeta])* pub $field: $ty, )*
        }

        const _: () = {
            use $crate::codec::Field;

            #[derive(
                ::zerocopy::FromBytes,
                ::zerocopy::IntoBytes,
                ::zerocopy::KnownLayout,
                ::zerocopy::Immutable,
                ::zerocopy::Unaligned,
            )]
            #[repr(C)]
            pub(crate) struct Wire {
                $( $field: <$ty as Field>::Wire, )*
            }

            impl Field for $name {
                type Wire = Wire;
                fn to_wire(&self) -> Wire {
                    Wire { $( $field: Field::to_wire(&self.$field), )* }
                }
                fn from_wire(wire: &Wire) -> Result<Self, $crate::codec::Invalid> {
                    Ok(Self { $( $field: <$ty as Field>::from_wire(&wire.$field)?, )* })
                }
            }
        };
    };
    (
        $(#[$meta:meta])*
        pub struct $name:ident {
            $( $(#[$fmeta:meta])* $field:ident : $ty:ty, )*
            ..
            $(#[$rmeta:meta])* $rest:ident : $rty:ty $(,)?
        }
    ) => {
        $(#[$meta])*
        pub struct $name {
            $( $(#[$fmeta])* pub $field: $ty, )*
            $(#[$rmeta])* pub $rest: $rty,
        }

        const _: () = {
            use $crate::codec::{Body, BodyError};

            #[derive(
                ::zerocopy::FromBytes,
                ::zerocopy::IntoBytes,
                ::zerocopy::KnownLayout,
                ::zerocopy::Immutable,
                ::zerocopy::Unaligned,
            )]
            #[repr(C)]
            pub(crate) struct Head {
                $( $field: <$ty as $crate::codec::Field>::Wire, )*
                $rest: <$rty as Body>::Head,
            }

            impl Body for $name {
                type Head = Head;
                const HAS_REST: bool = <$rty as Body>::HAS_REST;
                fn head(&self) -> Head {
                    Head {
                        $( $field: $crate::codec::Field::to_wire(&self.$field), )*
                        $rest: Body::head(&self.$rest),
                    }
                }
                fn rest_len(&self) -> usize {
                    Body::rest_len(&self.$rest)
                }
                fn put_rest(&self, out: &mut Vec<u8>) {
                    Body::put_rest(&self.$rest, out)
                }
                fn decode(head: &Head, rest: ::bytes::Bytes) -> Result<Self, BodyError> {
                    Ok(Self {
                        $(
                            $field: <$ty as $crate::codec::Field>::from_wire(&head.$field)
                                .map_err(BodyError::Invalid)?,
                        )*
                        $rest: <$rty as Body>::decode(&head.$rest, rest)?,
                    })
                }
            }
        };
    };
}

/// The [`Field`] of a `u8` wire enum whose unknown values are refused: the byte decodes only
/// when it is one of the enum's named values, else the frame is malformed (field `$what`).
macro_rules! known_u8_field {
    ($name:ident, $what:literal) => {
        impl $crate::codec::Field for $name {
            type Wire = u8;
            fn to_wire(&self) -> u8 {
                self.0
            }
            fn from_wire(wire: &u8) -> Result<Self, $crate::codec::Invalid> {
                let value = $name(*wire);
                if value.is_known() {
                    Ok(value)
                } else {
                    Err($what)
                }
            }
        }
    };
}

/// Declares a wire enum as a newtype over its integer with named constants, in the manner of
/// rustls `enum_builder!`: unknown values stay representable (`MsgType(9)`), `Debug` prints a
/// known value's name (`TEXT`) and an unknown one's number (`MsgType(9)`), and a duplicate value
/// in the table is an unreachable pattern (a compile error under `-D warnings`).
macro_rules! wire_enum {
    (
        $(#[$meta:meta])*
        pub struct $name:ident($repr:ty) {
            $( $(#[$cmeta:meta])* $konst:ident = $val:expr, )*
        }
    ) => {
        $(#[$meta])*
        #[derive(Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
        pub struct $name(pub $repr);

        impl $name {
            $( $(#[$cmeta])* pub const $konst: $name = $name($val); )*

            /// Every named value, in table order.
            pub const ALL: &'static [$name] = &[ $( $name::$konst, )* ];

            /// The constant's name (`SCREAMING_CASE`, as written in the code), or `None` for a
            /// value this build does not know.
            pub const fn name(self) -> Option<&'static str> {
                match self {
                    $( $name::$konst => Some(stringify!($konst)), )*
                    _ => None,
                }
            }

            /// Whether this build knows the value.
            pub const fn is_known(self) -> bool {
                self.name().is_some()
            }

            /// `Some` for a value this build knows, `None` otherwise (the old `from_u8`).
            pub const fn known(v: $repr) -> Option<Self> {
                if $name(v).is_known() {
                    Some($name(v))
                } else {
                    None
                }
            }
        }

        impl ::std::fmt::Debug for $name {
            fn fmt(&self, f: &mut ::std::fmt::Formatter<'_>) -> ::std::fmt::Result {
                match self.name() {
                    Some(name) => f.write_str(name),
                    None => write!(f, concat!(stringify!($name), "({})"), self.0),
                }
            }
        }

        impl ::std::fmt::LowerHex for $name {
            fn fmt(&self, f: &mut ::std::fmt::Formatter<'_>) -> ::std::fmt::Result {
                ::std::fmt::LowerHex::fmt(&self.0, f)
            }
        }

        impl ::std::fmt::UpperHex for $name {
            fn fmt(&self, f: &mut ::std::fmt::Formatter<'_>) -> ::std::fmt::Result {
                ::std::fmt::UpperHex::fmt(&self.0, f)
            }
        }

        impl From<$repr> for $name {
            fn from(v: $repr) -> Self {
                $name(v)
            }
        }

        impl From<$name> for $repr {
            fn from(v: $name) -> Self {
                v.0
            }
        }
    };
}
