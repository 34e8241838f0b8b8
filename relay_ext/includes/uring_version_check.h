/* Included right after python-liburing's liburing.h.  Debian's liburing-dev (2.3) sits in
 * /usr/include and a wrong include path would pick it up without a sound: its structs differ
 * from the ones python-liburing's compiled functions use, so the mismatch must stop the build. */
#ifndef RELAY_URING_VERSION_CHECK_H
#define RELAY_URING_VERSION_CHECK_H
#ifndef IO_URING_VERSION_MAJOR
#error "relay: liburing.h without IO_URING_VERSION_MAJOR: Debian's liburing-dev was picked up instead of python-liburing's liburing 2.6 headers"
#endif
#if IO_URING_VERSION_MAJOR != 2 || IO_URING_VERSION_MINOR != 6
#error "relay: liburing headers are not 2.6: they must come from python-liburing==2024.5.3"
#endif
#define RELAY_LIBURING_VERSION_MAJOR IO_URING_VERSION_MAJOR
#define RELAY_LIBURING_VERSION_MINOR IO_URING_VERSION_MINOR
#endif
