"""The suppression list at work: what adds an address (`mtad.suppression.trigger`, the event stream's
``suppression`` consumer group, deciding by `mtad.suppression.policy`) and the delivery-time check that
keeps mail from going to one (`mtad.suppression.lookup`, used by `mtad.outbound.delivery`). The list
itself is `mtad.store.suppressions`."""
