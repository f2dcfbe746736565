//! Site selection: DNS SRV and RSerPool pool-element policies.
