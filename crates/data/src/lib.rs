//! Fetching the real corpora (chitchat, Brown, State of the Union) into `$CHORUS_CACHE`, parsers, the three tasks (story continuation, dialogue response, open-ended), document-level splits, and
//!
//! Not implemented yet: see README.md.
