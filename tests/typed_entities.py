"""Entities with typed payloads and states (loaded by workers through KEYQ_ENTITY_MODULES)."""

from __future__ import annotations

from dataclasses import dataclass

from pydantic import BaseModel, Field

from keyq import Entity, Reject, handler


class Amount(BaseModel):
    amount: int = Field(gt=0)
    note: str | None = None


class Balance(BaseModel):
    balance: int = 0


class TypedWallet(Entity):
    """The README's Wallet with a pydantic payload, state and reply."""

    name = "typed-wallet"
    initial_state = Balance()

    @handler
    def deposit(self, state: Balance, payload: Amount) -> tuple[Balance, Balance]:
        new = Balance(balance=state.balance + payload.amount)
        return new, new

    @handler
    def withdraw(self, state: Balance, payload: Amount) -> tuple[Balance, int]:
        if payload.amount > state.balance:
            raise Reject("insufficient funds")
        return Balance(balance=state.balance - payload.amount), state.balance - payload.amount

    @handler
    def peek(self, state: dict[str, int], payload: object) -> tuple[dict[str, int], object]:
        return state, payload  # untyped: plain JSON in, as before


@dataclass
class Step:
    by: int
    label: str = "step"


class DataclassCounter(Entity):
    name = "dc-counter"
    initial_state = {"n": 0}

    @handler
    def add(self, state: dict[str, int], payload: Step) -> tuple[dict[str, int], int]:
        n = state["n"] + payload.by
        return {"n": n}, n
